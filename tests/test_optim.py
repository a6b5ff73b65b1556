"""Robust fine-tuning optimizers (equiray.optim): FTP, TPGM, SPD, L2-SP and plain fine-tuning."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.optim import (FTP, FTP_STATE_KEYS, L2SP, SPD, TPGM, FineTune, make_optimizer, row_l1_norms)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra intra-op threads only fight over the shared CPU cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    """A pretrained body (conv + linear, with biases) and a new head."""

    def __init__(self, seed: int = 0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.head = nn.Linear(12, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))))


def batches(n: int, *, seed: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(3, (size,), generator=g))
            for _ in range(n)]


def train(model, opt, data, *, regularize=False, project_every=None, val=None):
    for i, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x), y)
        if regularize:
            loss = loss + opt.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if project_every and (opt.state[next(model.parameters())]["step"] % project_every == 0):
            opt.project(model, val, F.cross_entropy, steps=2, radius_lr=0.05)


def constrained(model, opt):
    return [(n, p) for n, p in model.named_parameters() if "anchor" in opt.state[p]]


def assert_within_radius(model, opt):
    pairs = constrained(model, opt)
    assert pairs
    for name, p in pairs:
        st = opt.state[p]
        diff = p.detach() - st["anchor"]
        rows = diff.reshape(diff.shape[0] if diff.dim() >= 2 else 1, -1).abs().sum(1)
        assert (rows <= st["gamma"] + 1e-6).all(), (name, rows.max().item(), st["gamma"].item())


# ------------------------------------------------------------------------------------------------ FTP

def test_ftp_projection_keeps_every_row_within_its_radius():
    model = Net()
    opt = FTP(model.named_parameters(), lr=1e-2, exclude=("head.*",))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    tight = 0
    for x, y in batches(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert_within_radius(model, opt)
        for _, p in constrained(model, opt):      # the projection is active: some row sits on its sphere
            n = row_l1_norms(p.detach() - opt.state[p]["anchor"])
            tight += int((n >= 0.999 * opt.state[p]["gamma"]).any())
    assert tight > 0
    assert {n for n, _ in constrained(model, opt)} == {"conv.weight", "conv.bias", "fc1.weight", "fc1.bias"}
    for n, p in constrained(model, opt):          # anchors are the weights at construction
        assert torch.equal(opt.state[p]["anchor"], init[n])
        assert opt.state[p]["gamma_step"] == 11
    # radii were learned (some grew from 1e-8; others may shrink back to it when dL/dgamma > 0)
    assert max(opt.state[p]["gamma"] for _, p in constrained(model, opt)) > 1e-2


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_ftp_with_k0_and_huge_radius_is_the_base_optimizer(base):
    # k=0 lets the radius only grow; mu=1 lets it keep up with the growing row norms (with the default
    # mu=1e-2 it lags behind them and the projection becomes active -- see the module docstring).
    kw = dict(lr=1e-2, weight_decay=0.1) if base == "adamw" else dict(lr=0.1, weight_decay=0.01, momentum=0.9,
                                                                        nesterov=True)
    m_ftp, m_ref = Net(), Net()
    opt = FTP(m_ftp.named_parameters(), base=base, k=0.0, mu=1.0, gamma_init=1e6, **kw)
    ref = (torch.optim.AdamW if base == "adamw" else torch.optim.SGD)(m_ref.parameters(), **kw)
    for x, y in batches(10):
        for m, o in ((m_ftp, opt), (m_ref, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        torch.testing.assert_close(dict(m_ftp.named_parameters()), dict(m_ref.named_parameters()))
    assert all(opt.state[p]["gamma_step"] == 9 for _, p in constrained(m_ftp, opt))


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_ftp_with_small_radius_differs_from_the_base_and_stays_closer_to_the_anchor(base):
    kw = dict(lr=1e-2) if base == "adamw" else dict(lr=0.1, momentum=0.9)
    m_ftp, m_ref = Net(), Net()
    init = {n: p.detach().clone() for n, p in m_ftp.named_parameters()}
    opt = FTP(m_ftp.named_parameters(), base=base, mu=1e-3, **kw)
    ref = (torch.optim.AdamW if base == "adamw" else torch.optim.SGD)(m_ref.parameters(), weight_decay=0, **kw)
    for x, y in batches(10):
        for m, o in ((m_ftp, opt), (m_ref, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for n, p in m_ftp.named_parameters():
        q = dict(m_ref.named_parameters())[n]
        assert not torch.allclose(p, q)
        assert (p - init[n]).abs().sum() < 0.5 * (q - init[n]).abs().sum()


class Odd(nn.Module):
    """Tensors FTP's vectorised step must handle: a channels_last conv, a 0-D scale, a layer (``side``) that gets
    no gradient on some steps (so its radius step count falls behind the others')."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3).to(memory_format=torch.channels_last)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.side = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)
        self.double()

    def forward(self, x, side=True):
        h = torch.tanh(self.fc1(torch.tanh(self.conv(x)).flatten(1))) * self.scale
        return self.head(h + self.side(h) if side else h)


def ftp_reference(model, data, *, k, mu, base_cls, **kw):
    """FTP Algorithm 1 tensor by tensor on top of a torch optimizer (the formulas of the FTP docstring)."""
    from equiray.optim import _adam_scalar, _clip_radius, _project_rows
    base = base_cls(model.parameters(), **kw)
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    z = dict(dtype=torch.float64)
    state = {p: dict(anchor=p.detach().clone(), gamma=torch.tensor(1e-8, **z), gamma_exp_avg=torch.zeros((), **z),
                     gamma_exp_avg_sq=torch.zeros((), **z), gamma_step=0) for p in body}
    for i, (x, y) in enumerate(data):
        base.zero_grad()
        F.cross_entropy(model(x, side=i % 3 == 2), y).backward()
        base.step()
        with torch.no_grad():
            for p in (p for p in body if p.grad is not None):
                st = state[p]
                c = p - st["anchor"]
                n = row_l1_norms(c)
                if "prev_c" in st:
                    rows = c.shape[0] if c.dim() >= 2 else 1
                    g = ((p.grad.reshape(rows, -1) * st["prev_c"].reshape(rows, -1)).sum(1) / st["prev_n"]).sum()
                    _adam_scalar(st, torch.where(g > 0, g * k, g), lr=mu)
                    _clip_radius(st["gamma"], n)
                _project_rows(p, st["anchor"], c, (st["gamma"] / n).clamp(max=1.0))
                st["prev_c"], st["prev_n"] = c, n
    return state


@pytest.mark.parametrize("path", ["fused+scratch", "foreach"])
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_ftp_vectorised_step_matches_the_per_tensor_algorithm(base, path, monkeypatch):
    from equiray.optim import ftp, kernels
    if path == "foreach":   # the code paths of devices without fused kernels (e.g. MPS) and of CUDA for FTP
        monkeypatch.setattr(kernels, "_FUSED_DEVICES", ())
        monkeypatch.setattr(ftp, "_SCRATCH_DEVICES", ())
    kw = dict(lr=1e-2, weight_decay=0.05) if base == "adamw" else dict(lr=0.1, weight_decay=0.01, momentum=0.9,
                                                                       nesterov=True)
    data = batches(9)
    model, ref = Odd(), Odd()
    opt = FTP(model.named_parameters(), base=base, k=0.5, mu=1e-2, exclude=("head.*",), **kw)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x, side=i % 3 == 2), y).backward()
        opt.step()
    state = ftp_reference(ref, data, k=0.5, mu=1e-2,
                          base_cls=torch.optim.AdamW if base == "adamw" else torch.optim.SGD, **kw)
    torch.testing.assert_close(dict(model.named_parameters()), dict(ref.named_parameters()))
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(model.parameters(), ref.parameters()):
        if q in state:
            for key in ("gamma", "gamma_exp_avg", "gamma_exp_avg_sq", "prev_c", "prev_n"):
                torch.testing.assert_close(opt.state[p][key], state[q][key], msg=key)
            assert opt.state[p]["gamma_step"] == state[q]["gamma_step"]
    assert opt.state[model.side.weight]["gamma_step"] == 2 and opt.state[model.fc1.weight]["gamma_step"] == 8
    assert_within_radius(model, opt)


def test_excluded_parameters_get_exactly_the_base_update_and_no_ftp_state():
    model = Net()
    kw = dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99))
    opt = FTP(model.named_parameters(), exclude=("head.*",), **kw)
    head = [model.head.weight, model.head.bias]
    twin = [p.detach().clone().requires_grad_(True) for p in head]
    ref = torch.optim.AdamW(twin, **kw)
    body0 = model.fc1.weight.detach().clone()
    for x, y in batches(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for t, p in zip(twin, head):
            t.grad = p.grad.clone()
        opt.step()
        ref.step()
        for t, p in zip(twin, head):
            torch.testing.assert_close(p, t, rtol=0, atol=1e-14)
    for p in head:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert not set(opt.state[p]) & set(FTP_STATE_KEYS)
    assert set(FTP_STATE_KEYS) <= set(opt.state[model.fc1.weight])
    # and the body is projected (rows within the radius, far from the unconstrained update)
    assert row_l1_norms(model.fc1.weight.detach() - body0).max() <= opt.state[model.fc1.weight]["gamma"] + 1e-6


def test_param_groups_hold_only_hyperparameters():
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return 1
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors(v) for v in obj)
        return 0

    for name in ("finetune", "l2sp", "ftp", "tpgm"):
        model = Net()
        opt = make_optimizer(name, model, lr=1e-2, weight_decay=0.0, exclude=("head.*",))
        train(model, opt, batches(2))
        sd = opt.state_dict()
        assert tensors(sd["param_groups"]) == 0, name
        if name != "finetune":
            assert tensors(sd["state"]) > 0 and any("anchor" in s for s in sd["state"].values())
        groups = sd["param_groups"]
        assert [g.get("constrained") for g in groups] == [True, False]
        assert groups[1]["param_names"] == ["head.weight", "head.bias"]


def test_hyperparameters_are_per_group():
    model = Net()
    opt = FTP([{"params": list(model.conv.parameters()), "k": 0.5, "mu": 0.1, "gamma_init": 0.3},
               {"params": list(model.fc1.parameters())},
               {"params": list(model.head.parameters()), "constrained": False}], lr=1e-2)
    assert [g["k"] for g in opt.param_groups] == [0.5, 1.0, 1.0]
    assert opt.state[model.conv.weight]["gamma"].item() == 0.3
    assert opt.state[model.fc1.weight]["gamma"].item() == 1e-8
    assert "anchor" not in opt.state[model.head.weight]


# ------------------------------------------------------------------------------------ resume exactly

@pytest.mark.parametrize("method,knobs", [("ftp", {"base": "adamw"}),
                                          ("ftp", {"base": "sgd", "momentum": 0.9, "k": 0.5}),
                                          ("l2sp", {"alpha": 0.5, "beta": 0.1}),
                                          ("tpgm", {"radius_lr": 0.05}),
                                          ("spd", {"strength": 1.0})])
def test_state_dict_round_trip_resumes_bit_identically(method, knobs):
    data = batches(7)
    val = batches(1, seed=9)[0]
    kw = dict(regularize=method == "l2sp", project_every=2 if method == "tpgm" else None, val=val)
    model = Net()
    opt = make_optimizer(method, model, lr=1e-2, weight_decay=0.01, **knobs)
    train(model, opt, data[:3], **kw)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, data[3:], **kw)

    buf.seek(0)
    ckpt = torch.load(buf)
    fresh = Net(seed=123)                      # different initial weights: everything must come from the ckpt
    fresh.load_state_dict(ckpt["model"])
    fresh_opt = make_optimizer(method, fresh, lr=1.0, weight_decay=0.5, **knobs)  # anchors = W_3, wrong lr
    fresh_opt.load_state_dict(ckpt["opt"])
    train(fresh, fresh_opt, data[3:], **kw)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        a, b = opt.state[p], fresh_opt.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]), key
    # rewinding the same optimizer works too (nothing it cached about the replaced state is reused)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    train(model, opt, data[3:], **kw)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------------------------- SPD

def _spd_step(w0, w, g, *, lr=0.1, strength=1.0):
    """One SPD step on a single tensor with SGD as the base, W moved to ``w`` after the anchor ``w0`` was taken."""
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = SPD([p], base="sgd", lr=lr, strength=strength)
    with torch.no_grad():
        p.copy_(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    return p.detach()


def test_spd_step_is_the_papers_formula_when_inconsistent_and_the_base_step_otherwise():
    """Algorithm 1 of Tian et al. 2024 by hand: W0 = 0, W = (1, 0). g = (1, -10) points along the deviation
    (-<g, W - W0> = -1 < 0: inconsistent), the SGD step gives W~ = (0.9, 1.0), the step added r = (|W~| - 1) / |W~|
    of the deviation, and lambda * r of W~ - W0 is taken back. g = (-1, 0) is consistent: the SGD step alone."""
    tilde = torch.tensor([0.9, 1.0], dtype=torch.float64)
    r = (tilde.norm() - 1.0) / tilde.norm()
    for strength in (1.0, 0.5):
        got = _spd_step([0.0, 0.0], [1.0, 0.0], [1.0, -10.0], strength=strength)
        assert torch.allclose(got, tilde - strength * r * tilde, atol=1e-12), (strength, got)
    # strength 1: the inconsistent step may turn the deviation but not lengthen it
    assert torch.isclose(_spd_step([0.0, 0.0], [1.0, 0.0], [1.0, -10.0]).norm(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(_spd_step([0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]), torch.tensor([1.1, 0.0], dtype=torch.float64))
    # inconsistent, but the step shortened the deviation (r = 0): nothing to take back
    assert torch.allclose(_spd_step([0.0, 0.0], [1.0, 0.0], [1.0, 0.0]), torch.tensor([0.9, 0.0], dtype=torch.float64))
    # at the anchor there is no deviation yet: the first step is the base step
    assert torch.equal(_spd_step([0.0, 0.0], [0.0, 0.0], [1.0, -10.0]), torch.tensor([-0.1, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_spd_with_strength_0_is_the_base_optimizer_and_with_strength_keeps_closer(base):
    """Equivalence: strength 0 is plain fine-tuning bit for bit. Sensitivity: strength 1 ends closer to the
    anchor in every constrained tensor that moved, and no inconsistent step lengthened a deviation; the head
    (excluded) is trained by the base optimizer alone and has no anchor."""
    data = batches(12)
    knobs = {"base": base, **({"momentum": 0.9} if base == "sgd" else {})}
    ref, off, on = Net(), Net(), Net()
    train(ref, make_optimizer("finetune", ref, lr=5e-2, weight_decay=0.01, **knobs), data)
    opt_off = make_optimizer("spd", off, lr=5e-2, weight_decay=0.01, strength=0.0, **knobs)
    train(off, opt_off, data)
    for (n, p), q in zip(ref.named_parameters(), off.parameters()):
        assert torch.equal(p, q), n
    opt = make_optimizer("spd", on, lr=5e-2, weight_decay=0.0, strength=1.0, **knobs)
    assert "anchor" not in opt.state[on.head.weight] and "anchor" in opt.state[on.fc1.weight]
    free = Net()
    train(free, make_optimizer("finetune", free, lr=5e-2, weight_decay=0.0, **knobs), data)
    grew_back = 0
    for x, y in data:
        before = {n: (p.detach() - opt.state[p]["anchor"]).norm() for n, p in constrained(on, opt)}
        loss = F.cross_entropy(on(x), y)
        opt.zero_grad()
        loss.backward()
        inconsistent = {n: float((p.grad * (p.detach() - opt.state[p]["anchor"])).sum()) > 0
                        for n, p in constrained(on, opt)}
        opt.step()
        for n, p in constrained(on, opt):
            after = (p.detach() - opt.state[p]["anchor"]).norm()
            if inconsistent[n] and before[n] > 0:
                assert after <= before[n] * (1 + 1e-9) + 1e-12, (n, float(before[n]), float(after))
                grew_back += 1
    assert grew_back > 0  # the condition did fire
    for (n, p), q, f in zip(on.named_parameters(), Net().parameters(), free.parameters()):
        if not n.startswith("head"):
            assert (p - q).norm() < (f - q).norm(), n


def test_spd_rejects_a_bad_strength():
    with pytest.raises(ValueError, match="spd: strength must be a finite number >= 0"):
        make_optimizer("spd", Net(), lr=1e-2, weight_decay=0.0, strength=-1.0)


# --------------------------------------------------------------------------------------------- L2-SP

def test_l2sp_regularizer_is_the_hand_formula():
    model = Net()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = L2SP(model.named_parameters(), lr=1e-2, alpha=0.3, beta=0.0, exclude=("head.*",))
    assert opt.regularizer(model).item() == 0.0
    opt2 = L2SP(model.named_parameters(), lr=1e-2, alpha=0.3, beta=0.05, exclude=("head.*",))
    head_sq = sum(p.detach().pow(2).sum() for p in model.head.parameters())
    torch.testing.assert_close(opt2.regularizer(model).detach(), 0.05 / 2 * head_sq)

    train(model, opt2, batches(5), regularize=True)
    reg = opt2.regularizer(model)
    assert reg.requires_grad
    body = sum((p.detach() - init[n]).pow(2).sum() for n, p in model.named_parameters() if not n.startswith("head"))
    head_sq = sum(p.detach().pow(2).sum() for p in model.head.parameters())
    assert body > 0
    torch.testing.assert_close(reg.detach(), 0.3 / 2 * body + 0.05 / 2 * head_sq)
    for other in ("finetune", "ftp", "tpgm"):
        assert make_optimizer(other, Net(), lr=1e-2, weight_decay=0.0).regularizer(model).item() == 0.0


# ---------------------------------------------------------------------------------------------- TPGM

def test_tpgm_project_fits_radii_that_lower_the_held_out_loss():
    teacher = Net(seed=0)                      # the pretrained model is right on the held-out distribution
    model = Net(seed=0)
    g = torch.Generator().manual_seed(5)
    x_tr = torch.randn(32, 1, 6, 6, generator=g, dtype=torch.float64)
    x_val = torch.randn(64, 1, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y_val = teacher(x_val)
        y_tr = teacher(x_tr) + torch.randn(32, 3, generator=g, dtype=torch.float64)   # noisy fine-tuning labels
    opt = TPGM(model.named_parameters(), lr=2e-2, exclude=("head.*",))
    for _ in range(15):
        opt.zero_grad()
        F.mse_loss(model(x_tr), y_tr).backward()
        opt.step()
    assert not any("gamma" in opt.state[p] for p in model.parameters())
    with torch.no_grad():
        before = F.mse_loss(model(x_val), y_val).item()
    losses = opt.project(model, (x_val, y_val), F.mse_loss, steps=8, radius_lr=1.0)
    with torch.no_grad():
        after = F.mse_loss(model(x_val), y_val).item()
    assert losses[0] == pytest.approx(before)  # initial radii = largest row norms: a no-op start
    assert after < 0.7 * before
    assert losses == sorted(losses, reverse=True)
    assert_within_radius(model, opt)
    for _, p in constrained(model, opt):
        assert opt.state[p]["gamma_step"] == 8
    assert "gamma" not in opt.state[model.head.weight]


def test_tpgm_projects_inside_step_when_given_held_out_batches():
    model = Net()
    val = batches(1, seed=3)[0]
    opt = make_optimizer("tpgm", model, lr=1e-2, weight_decay=0.0, val_batches=lambda: val,
                         loss_fn=F.cross_entropy, projection_interval=3, projection_steps=2)
    train(model, opt, batches(3)[:2])
    assert "gamma" not in opt.state[model.fc1.weight]
    train(model, opt, batches(3)[2:])
    assert opt.state[model.fc1.weight]["gamma_step"] == 2
    assert_within_radius(model, opt)


# -------------------------------------------------------------------------------------------- errors

def test_clear_errors():
    model = Net()
    with pytest.raises(ValueError, match=r"unknown optimizer 'ftpp'.*'finetune', 'ftp', 'l2sp', 'spd', 'tpgm'"):
        make_optimizer("ftpp", model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"k .*must be in \[0, 1\], got 1.5"):
        FTP(model.named_parameters(), k=1.5)
    with pytest.raises(ValueError, match=r"k .*must be in \[0, 1\]"):
        FTP([{"params": list(model.conv.parameters()), "k": -0.1}])
    with pytest.raises(ValueError, match=r"\['classifier\.\*'\] match no parameter.*conv\.weight"):
        FTP(model.named_parameters(), exclude=("head.*", "classifier.*"))
    with pytest.raises(ValueError, match="no parameter is left to constrain"):
        FTP(model.named_parameters(), exclude=("*",))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gamma'\].*gamma_init"):
        make_optimizer("ftp", model, lr=1e-3, weight_decay=0.0, gamma=1.0)
    with pytest.raises(ValueError, match="base must be one of"):
        FTP(model.named_parameters(), base="adam")
    with pytest.raises(ValueError, match="needs parameter names"):
        FTP(model.parameters(), exclude=("head.*",))
    # a model without a recognisable head: constrained methods ask for explicit patterns, finetune does not
    bare = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="could not find the classifier head"):
        make_optimizer("ftp", bare, lr=1e-3, weight_decay=0.0)
    assert isinstance(make_optimizer("finetune", bare, lr=1e-3, weight_decay=0.0), FineTune)


def test_make_optimizer_finds_the_head_and_skips_frozen_parameters():
    model = Net()
    model.conv.bias.requires_grad_(False)
    opt = make_optimizer("ftp", model, lr=1e-3, weight_decay=0.0, base="sgd", momentum=0.9)
    assert isinstance(opt, FTP)
    assert opt.param_groups[0]["param_names"] == ["conv.weight", "fc1.weight", "fc1.bias"]
    assert opt.param_groups[1]["param_names"] == ["head.weight", "head.bias"]
    assert opt.param_groups[0]["base"] == "sgd" and opt.param_groups[0]["momentum"] == 0.9
    assert "anchor" not in opt.state[model.conv.bias]


# ----------------------------------------------------------------------------------- registry and knobs

def test_the_registry_names_every_method_and_method_knobs_are_its_per_group_hyperparameters():
    from equiray.optim import METHODS, OPTIMIZERS, method_knobs
    assert OPTIMIZERS.names() == ["finetune", "ftp", "l2sp", "spd", "tpgm"] and METHODS is OPTIMIZERS
    assert {n: method_knobs(n) for n in OPTIMIZERS} == {"finetune": (), "ftp": ("k", "mu", "gamma_init"),
                                                         "l2sp": ("alpha", "beta"), "tpgm": ("radius_lr",),
                                                         "spd": ("strength",)}
    shared = set(FineTune(Net().named_parameters()).defaults)
    for name in OPTIMIZERS:             # the knobs are exactly what the method keeps per parameter group
        opt = make_optimizer(name, Net(), lr=1e-2, weight_decay=0.0)
        assert set(opt.defaults) - shared == set(method_knobs(name)), name
    with pytest.raises(ValueError, match=r"unknown optimizer 'ftpp'.*'finetune', 'ftp', 'l2sp', 'spd', 'tpgm'"):
        method_knobs("ftpp")


# ------------------------------------------------------------------------- RobustFineTuner (train_epoch)

def hand_written_epoch(model, opt, x, y, *, batch_size, gen, holdout=None, projection_interval=10):
    """The loop RobustFineTuner replaced (pipelines/ftp.py before the redesign): task loss + regularizer,
    TPGM projecting on a random held-out batch every `projection_interval` steps; returns the task loss."""
    model.train()
    total, n = 0.0, 0
    for step, idx in enumerate(torch.randperm(len(y), generator=gen).split(batch_size)):
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        reg = opt.regularizer(model)
        opt.zero_grad(set_to_none=True)
        (loss + reg).backward()
        opt.step()
        if isinstance(opt, TPGM) and holdout is not None and (step + 1) % projection_interval == 0:
            hx, hy = holdout
            pick = torch.randint(len(hy), (min(batch_size, len(hy)),), generator=gen)
            opt.project(model, (hx[pick], hy[pick]), F.cross_entropy)
        total += float(loss.detach()) * len(yb)
        n += len(yb)
    return total / max(n, 1)


@pytest.mark.parametrize("method,knobs", [("finetune", {}), ("l2sp", {"alpha": 0.3, "beta": 0.01}),
                                          ("ftp", {"k": 0.5, "mu": 0.05, "gamma_init": 1e-5}),
                                          ("tpgm", {"radius_lr": 0.05}), ("spd", {"strength": 0.5})])
def test_robust_fine_tuner_epochs_are_the_hand_written_loop_bit_for_bit(method, knobs):
    from equiray.optim import RobustFineTuner, fits_on_holdout
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(3, (90,), generator=g)
    holdout = None
    if fits_on_holdout(method):
        holdout, x, y = (x[-30:], y[-30:]), x[:-30], y[:-30]
    ref = Net()
    opt = make_optimizer(method, ref, lr=1e-2, weight_decay=0.01, **knobs)
    gen_ref = torch.Generator().manual_seed(0)
    want = [hand_written_epoch(ref, opt, x, y, batch_size=8, gen=gen_ref, holdout=holdout, projection_interval=2)
            for _ in range(2)]
    model = Net()
    tuner = RobustFineTuner(model, method, lr=1e-2, weight_decay=0.01, batch_size=8, holdout=holdout,
                            projection_interval=2, **knobs)
    gen = torch.Generator().manual_seed(0)
    got = [tuner.epoch(x, y, generator=gen) for _ in range(2)]
    assert [s.loss for s in got] == want                 # the task loss, without L2-SP's penalty
    assert all(s.samples == len(y) for s in got)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(gen.get_state(), gen_ref.get_state())
    if method == "tpgm":                                   # it did project: radii exist and were fitted
        assert tuner.optimizer.state[model.fc1.weight]["gamma_step"] > 0
