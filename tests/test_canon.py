"""Canonicalizers: equivariance of the scores and layers, invariance of the wrapped model, and sensitivity twins."""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.canon import (CanonicalizedModel, GroupConv, GroupLiftConv, canonicalizer_input_size, contrastive_loss,
                           create_canonicalizer, identity_rate, list_canonicalizers, prior_loss, straight_through)
from equiray.errors import EquirayError
from equiray.groups import get_group
from equiray.models import create_model

EXACT = ["C4", "D4", "C2", "D1"]


def smooth_images(gen, b=4, size=21):
    """Blurred noise inside a disk: interpolated rotations barely change such images."""
    x = torch.rand(b, 1, size, size, generator=gen, dtype=torch.float64)
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return x * ((r[:, None] ** 2 + r[None, :] ** 2) <= (size / 2 - 2) ** 2)


def permuted(scores, group, g):
    """scores(g.x) must equal scores(x) re-indexed: [h] -> [g^-1 h]."""
    idx = group.compose(group.inverse(torch.tensor(g)), torch.arange(group.order))
    return scores[:, idx]


@pytest.mark.parametrize("gname", EXACT)
def test_group_conv_layers_are_equivariant(gname, gen):
    g = get_group(gname)
    torch.manual_seed(0)
    net = nn.Sequential(GroupLiftConv(1, 3, 5, g), nn.ReLU(), GroupConv(3, 2, 3, g)).double()
    x = torch.rand(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    y = net(x)
    assert y.shape == (2, 2, g.order, 12, 12)
    for e in g.elements():
        torch.testing.assert_close(net(g.act(x, e)), g.act_output(y, e, "regular"))


def test_group_conv_is_not_equivariant_to_a_non_symmetry(gen):
    """Sensitivity: a C4 group conv does not commute with a reflection (not in C4) under any channel shift."""
    g = get_group("C4")
    torch.manual_seed(0)
    net = nn.Sequential(GroupLiftConv(1, 3, 5, g), nn.ReLU(), GroupConv(3, 2, 3, g)).double()
    x = torch.rand(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    y, y_flip = net(x), net(x.flip(-1))
    for e in g.elements():
        assert (y_flip - g.act_output(y.flip(-1), e, "regular")).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list_canonicalizers())
@pytest.mark.parametrize("gname", EXACT)
def test_scores_permute_exactly(kind, gname, gen):
    g = get_group(gname)
    torch.manual_seed(0)
    canon = create_canonicalizer(kind, g, in_chans=1).double()
    x = torch.rand(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    s = canon(x)
    assert s.shape == (3, g.order)
    for e in g.elements():
        torch.testing.assert_close(canon(g.act(x, e)), permuted(s, g, e))


@pytest.mark.parametrize("gname", EXACT)
def test_batch_norm_and_dropout_keep_the_scores_equivariant(gname, gen):
    """Batch norm shares its statistics over group elements and pixels, so it commutes with the action in both
    modes; dropout is off at inference. Sensitivity: the scores change when the statistics do."""
    g = get_group(gname)
    torch.manual_seed(0)
    canon = create_canonicalizer("equivariant", g, channels=3, layers=3, batch_norm=True, dropout=0.5).double()
    x = torch.rand(6, 1, 16, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for m in canon.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    canon.eval()
    s = canon(x)
    for e in g.elements():
        torch.testing.assert_close(canon(g.act(x, e)), permuted(s, g, e))
    with torch.no_grad():  # inference folds each batch norm into the conv before it: the same scores
        torch.testing.assert_close(canon(x), s.detach())
    canon.net[1].train()  # batch statistics instead of the running ones: equivariant too, but different scores
    s_batch = canon(x)
    torch.testing.assert_close(canon(g.act(x, 1)), permuted(s_batch, g, 1))
    assert (s_batch - s).abs().max() > 1e-4
    with pytest.raises(EquirayError, match="dropout"):
        create_canonicalizer("equivariant", g, dropout=1.5)


@pytest.mark.parametrize("gname", EXACT)
def test_the_sweeps_canonicalizer_is_equivariant_on_fashion_mnist_sized_inputs(gname, gen):
    """The configured canonicalizer (area resampling 28 -> 9 px, batch norm, the factored lifting conv at
    inference) on 28x28 images: its scores permute exactly for the grid's symmetries. Sensitivity: a shift by two
    pixels, not a symmetry, changes them beyond any permutation."""
    from equiray_pipelines.canon import CanonConfig

    g = get_group(gname)
    torch.manual_seed(0)
    canon = create_canonicalizer("equivariant", g, **CanonConfig().canonicalizers.kwargs("equivariant")).double()
    x = torch.rand(8, 1, 28, 28, generator=gen, dtype=torch.float64)
    canon.train()(x)  # running statistics away from (0, 1)
    canon.eval()
    with torch.no_grad():
        s = canon(x)
        for e in g.elements():
            torch.testing.assert_close(canon(g.act(x, e)), permuted(s, g, e))
        shifted = canon(torch.roll(x, 2, dims=-1))
    assert min(float((shifted - permuted(s, g, e)).abs().max()) for e in g.elements()) > 1e-4


def test_the_sweeps_canonicalizer_options_are_typed():
    """Each kind's options are a typed section: an unknown option, an unknown kind or a wrong type fails at load;
    the options a config sets (and only those) reach the canonicalizer."""
    from equiray.config import load_config
    from equiray.errors import ConfigError
    from equiray_pipelines.canon import CanonConfig

    with pytest.raises(ConfigError, match=r"unknown config key 'canonicalizers.equivariant.widht'"):
        load_config(CanonConfig, {"canonicalizers": {"equivariant": {"widht": 3}}})
    with pytest.raises(ConfigError, match=r"unknown config key 'canonicalizers.magic'"):
        load_config(CanonConfig, {"canonicalizers": {"magic": {}}})
    with pytest.raises(ConfigError, match=r"canonicalizers.optimized.embed_dim"):
        load_config(CanonConfig, {"canonicalizers": {"optimized": {"embed_dim": "big"}}})
    cfg = load_config(CanonConfig, {"canonicalizers": {"equivariant": {"channels": 4, "kernel_size": 3}}})
    assert cfg.canonicalizers.kwargs("equivariant") == {"channels": 4, "kernel_size": 3}
    assert cfg.canonicalizers.kwargs("optimized") == {}  # a section replaces the sweep's defaults whole
    assert CanonConfig().canonicalizers.kwargs("optimized") == {"network": "small_cnn", "network_kwargs": {"width": 4},
                                                               "embed_dim": 16, "input_size": 7}
    assert set(f.name for f in dataclasses.fields(cfg.canonicalizers)) == set(list_canonicalizers())


@pytest.mark.parametrize("kind", list_canonicalizers())
def test_scores_are_sensitive(kind, gen):
    """The scores move with the input (a constant canonicalizer would pass the test above) and a reflection,
    which C4 does not contain, breaks the permutation rule."""
    g = get_group("C4")
    torch.manual_seed(0)
    canon = create_canonicalizer(kind, g, in_chans=1).double()
    x = torch.rand(3, 1, 16, 16, generator=gen, dtype=torch.float64)
    s = canon(x)
    assert (canon(g.act(x, 1)) - s).abs().max() > 1e-4
    s_flip = canon(x.flip(-1))
    assert min(float((s_flip - permuted(s, g, e)).abs().max().detach()) for e in g.elements()) > 1e-4


@pytest.mark.parametrize("kind", list_canonicalizers())
@pytest.mark.parametrize("gname", ["C4", "D4"])
def test_wrapped_model_is_invariant_and_reports_elements(kind, gname, gen):
    g = get_group(gname)
    torch.manual_seed(0)
    model = create_model("canonicalized", backbone="small_cnn", backbone_kwargs={"width": 4}, canonicalizer=kind,
                         group=gname).double().eval()
    x = torch.rand(5, 1, 16, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, info = model.forward_with_info(x)
        for e in g.elements():
            y_e, info_e = model.forward_with_info(g.act(x, e))
            torch.testing.assert_close(y_e, y)
            assert torch.equal(info_e.element, g.compose(torch.tensor(e), info.element))  # c(g.x) = g c(x)
            torch.testing.assert_close(info_e.inputs, info.inputs)  # the same canonical pose
        # sensitivity: the bare backbone is not invariant, and the wrapped model is not invariant to a flip
        # when its group has no reflections
        assert (model.backbone(g.act(x, 1)) - model.backbone(x)).abs().max() > 1e-4
        if not g.reflections:
            assert (model(x.flip(-1)) - y).abs().max() > 1e-4


def test_dense_outputs_are_equivariant(gen):
    g = get_group("C4")
    torch.manual_seed(0)
    backbone = nn.Conv2d(1, 2, 3, padding=1).double()  # a dense "segmentation" head
    model = CanonicalizedModel(backbone, create_canonicalizer("equivariant", g).double(), output="dense").eval()
    x = torch.rand(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        for e in g.elements():
            torch.testing.assert_close(model(g.act(x, e)), g.act(y, e))
        # sensitivity: with the output left unrotated ("invariant") the dense map is not equivariant
        model.output = model.output.__class__("invariant")
        assert (model(g.act(x, 1)) - g.act(model(x), 1)).abs().max() > 1e-4


def test_interpolated_groups_are_approximately_equivariant(gen):
    """C8: 45-degree turns interpolate, so the equivariant canonicalizer's scores permute only approximately: each
    rotated input's centred scores correlate with the permuted ones far better than with any other permutation
    (sensitivity). (The optimized canonicalizer's network is not equivariant at all; for C8 it is only as good as
    what it learns.)"""
    g = get_group("C8")
    torch.manual_seed(0)
    canon = create_canonicalizer("equivariant", g).double()
    x = smooth_images(gen, b=6)

    def corr(a, b):
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean())

    with torch.no_grad():
        s = canon(x)
        for e in g.elements():
            s_e = canon(g.act(x, e))
            right = corr(s_e, permuted(s, g, e))
            wrong = max(corr(s_e, permuted(s, g, o)) for o in g.elements() if o != e)
            assert right > 0.8 and right > wrong + 0.2, (e, right, wrong)


def test_straight_through_is_hard_forward_soft_backward():
    scores = torch.tensor([[0.1, 2.0, -1.0]], requires_grad=True)
    w = straight_through(scores, beta=2.0)
    assert torch.equal(w.detach(), torch.tensor([[0.0, 1.0, 0.0]]))
    (w * torch.tensor([[1.0, 0.0, 0.0]])).sum().backward()
    soft = torch.softmax(2.0 * scores.detach(), -1)
    expected = 2.0 * soft[0, 0] * (torch.tensor([1.0, 0.0, 0.0]) - soft[0])  # d softmax_0 / d scores
    torch.testing.assert_close(scores.grad[0], expected)


@pytest.mark.parametrize("kind", list_canonicalizers())
def test_training_reaches_the_canonicalizer_and_the_prior_works(kind, gen):
    """Gradients flow through the straight-through choice; a few steps of the prior make upright inputs map to
    the identity (the identity rate rises)."""
    g = get_group("C4")
    torch.manual_seed(0)
    model = create_model("canonicalized", backbone="small_cnn", backbone_kwargs={"width": 4}, canonicalizer=kind,
                         group="C4", beta=1.0)
    # upright images with an orientation to learn (brighter at the top), plus noise
    ramp = torch.linspace(1.0, 0.0, 12).view(1, 1, 12, 1).expand(32, 1, 12, 12)
    x = 0.5 * ramp + 0.5 * torch.rand(32, 1, 12, 12, generator=gen)
    y = torch.randint(10, (32,), generator=gen)
    opt = torch.optim.Adam(model.canonicalizer.parameters(), lr=0.05)
    logits, info = model.forward_with_info(x)
    F.cross_entropy(logits, y).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.canonicalizer.parameters())
    before = identity_rate(info.element, g)
    for _ in range(100):
        opt.zero_grad()
        info = model.canonicalize(x)
        loss = prior_loss(info.scores, g, beta=10.0)
        if info.embeddings is not None:
            loss = loss + contrastive_loss(info.embeddings)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = identity_rate(model.canonicalize(x).element, g)
    assert after > max(before, 0.9)


def test_contrastive_loss_is_zero_for_orthogonal_copies():
    assert float(contrastive_loss(torch.eye(4)[None])) == 0.0
    assert float(contrastive_loss(torch.ones(1, 4, 3) / 3 ** 0.5)) == pytest.approx(1.0)


def test_bad_options_get_clear_errors():
    with pytest.raises(EquirayError, match="unknown canonicalizer"):
        create_canonicalizer("magic", "C4")
    with pytest.raises(EquirayError, match="does not take"):
        create_canonicalizer("equivariant", "C4", widht=3)
    with pytest.raises(EquirayError, match="odd kernel"):
        create_canonicalizer("equivariant", "C4", kernel_size=4)
    with pytest.raises(EquirayError, match="crop"):
        create_canonicalizer("equivariant", "C4", crop=1.5)


def test_inference_reuses_expanded_filters_until_the_weights_change(gen):
    canon = create_canonicalizer("equivariant", "C8", channels=3).eval()
    x = torch.rand(2, 1, 12, 12, generator=gen)
    with torch.no_grad():
        first = canon(x)
        torch.testing.assert_close(canon(x), first)
        for p in canon.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))  # an optimizer step, in place
        updated = canon(x)
    assert (updated - first).abs().max() > 1e-4
    torch.testing.assert_close(updated, canon(x).detach())  # the grad-enabled path builds the filters afresh


@pytest.mark.parametrize("gname", ["C8", "D4"])
def test_pooled_last_layer_gives_the_per_pixel_scores(gname, gen):
    """The 1x1 last group conv runs after the disk pooling (they commute): the scores and their gradients are
    those of the per-pixel computation."""
    canon = create_canonicalizer("equivariant", gname, channels=3, layers=3, input_size=9)
    x = canon.prepare(torch.rand(4, 1, 18, 18, generator=gen))
    fast, _ = canon.score(x)
    r = torch.arange(9.0) - 4
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= 4.5 ** 2).float()
    slow = (canon.net(x) * disk).sum((-2, -1)).mean(1) / disk.sum()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    (g_fast,) = torch.autograd.grad(fast[:, 1].sum(), canon.net[0].weight)
    (g_slow,) = torch.autograd.grad(slow[:, 1].sum(), canon.net[0].weight)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gname", EXACT)
def test_pooled_canonicalizer_scores_permute_exactly(gname, gen):
    """``pool``: the lifting conv's maps averaged 2x2 before 3x3 group convs (28 -> 14 -> 7 px): the scores still
    permute exactly for the grid's symmetries, in training and folded inference. Sensitivity: a reflection,
    outside C4 and C2, and a two-pixel shift, no symmetry at all, move them beyond any permutation."""
    g = get_group(gname)
    torch.manual_seed(0)
    canon = create_canonicalizer("equivariant", g, channels=3, layers=3, hidden_kernel_size=3, pool=2,
                                 input_size=14, batch_norm=True).double()
    x = torch.rand(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    canon.train()(x)
    canon.eval()
    s = canon(x)
    for e in g.elements():
        torch.testing.assert_close(canon(g.act(x, e)), permuted(s, g, e))
    with torch.no_grad():
        torch.testing.assert_close(canon(x), s.detach())
        others = [canon(torch.roll(x, 2, dims=-1))] + ([] if g.reflections else [canon(x.flip(-1))])
    for moved in others:
        assert min(float((moved - permuted(s.detach(), g, e)).abs().max()) for e in g.elements()) > 1e-4


def test_pool_needs_a_size_it_divides():
    with pytest.raises(EquirayError, match="pool"):
        create_canonicalizer("equivariant", "C4", layers=1, pool=2)
    canon = create_canonicalizer("equivariant", "C4", layers=2, pool=2, input_size=9)
    with pytest.raises(ValueError, match="multiple"):
        canon(torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("image_px, setting, side", [
    (28, "auto", 28), (64, "auto", 64), (65, "auto", 32), (96, "auto", 48), (224, "auto", 56), (512, "auto", 64),
    (224, "full", 224), (224, None, 224), (224, 14, 14)])
def test_canonicalizer_input_size_scales_with_the_image(image_px, setting, side):
    assert canonicalizer_input_size(setting, image_px) == side


@pytest.mark.parametrize("bad", [0, -3, "half", 2.5, True])
def test_a_bad_input_size_fails_when_the_canonicalizer_is_built(bad):
    with pytest.raises(EquirayError, match="input_size"):
        create_canonicalizer("equivariant", "C4", input_size=bad)


@pytest.mark.parametrize("kind", ["equivariant", "optimized"])
def test_by_default_a_large_image_is_read_downsampled_and_a_small_one_in_full(kind, gen):
    """The default (``"auto"``) keeps a 224-px canonicalizer cheap without a setting, and stays equivariant: the
    averaging by a whole factor commutes with the quarter turns (sensitivity: the scores of a turned image are
    not those of the upright one)."""
    torch.manual_seed(0)
    canon = create_canonicalizer(kind, "C4", in_chans=3).double().eval()
    assert canon.prepare(torch.rand(2, 3, 224, 224)).shape[-1] == 56
    assert canon.prepare(torch.rand(2, 3, 28, 28)).shape[-1] == 28
    g = canon.group
    x = torch.rand(2, 3, 224, 224, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        s = canon(x)
        for e in g.elements():
            torch.testing.assert_close(canon(g.act(x, e)), permuted(s, g, e))
        shifted = canon(torch.roll(x, 8, dims=-1))
    assert min(float((shifted - permuted(s, g, e)).abs().max()) for e in g.elements()) > 1e-6


@pytest.mark.parametrize("options", [
    {"channels": 4, "layers": 2, "input_size": 7, "batch_norm": True, "dropout": 0.5},  # the sweep's, at 7x7
    {"channels": 4, "layers": 2, "input_size": 9, "batch_norm": True, "dropout": 0.5},  # area-resampled to 9x9
    {"channels": 4, "layers": 2, "input_size": 9, "batch_norm": True, "in_chans": 3},  # colour images
    {"channels": 3, "layers": 3, "hidden_kernel_size": 3, "batch_norm": True},  # spatial last conv
    {"channels": 3, "layers": 1},  # the lifting conv alone
    {"channels": 3, "layers": 3, "hidden_kernel_size": 3, "batch_norm": True, "pool": 2},  # pooled after the lift
])
@pytest.mark.parametrize("gname", ["C8", "D4"])
def test_folded_inference_gives_the_training_graphs_scores(options, gname, gen):
    """Inference runs on constants folded once (batch norms into convs, the channel mean into the last 1x1 conv):
    the same scores as the unfolded graph, rebuilt when a running statistic or a weight changes."""
    canon = create_canonicalizer("equivariant", gname, **options)
    chans = options.get("in_chans", 1)
    x = torch.rand(5, chans, 14, 14, generator=gen)
    canon.train()
    canon(x)  # one training batch moves the running statistics away from (0, 1)
    canon.eval()
    reference = canon(x).detach()  # grad enabled: the unfolded graph
    with torch.no_grad():
        torch.testing.assert_close(canon(x), reference, atol=1e-5, rtol=1e-5)
        # the lifting conv runs factored (J basis filters, then one matrix) when it is the only spatial conv
        factored = canon._folded(canon.prepare(x).shape[-1], x.device, x.dtype)[3] is not None
        assert factored == (options.get("hidden_kernel_size", 1) == 1 and options["layers"] <= 2)
        canon.train()(x * 3.0)  # new statistics
        canon.eval()
        moved = canon(x)
    assert (moved - reference).abs().max() > 1e-4 or not options.get("batch_norm")
    torch.testing.assert_close(moved, canon(x).detach(), atol=1e-5, rtol=1e-5)
    big = torch.rand(300, chans, 14, 14, generator=gen)  # CPU inference runs in chunks of 128 or 256 images
    with torch.no_grad():
        chunked = canon(big)
    torch.testing.assert_close(chunked, canon(big).detach(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- continuous pose
def _blobs(n: int = 64) -> torch.Tensor:
    """Smooth random shapes on a dark border (Fashion-MNIST-like), so rotations by any angle lose nothing."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = F.avg_pool2d(torch.rand(n, 1, 36, 36, generator=g), 9, stride=1)  # (n, 1, 28, 28)
    return F.pad(x[..., 6:22, 6:22] ** 3, (6, 6, 6, 6))


def _angle_error(a: torch.Tensor, b: torch.Tensor, degrees: float) -> torch.Tensor:
    """|(b - a) - degrees| wrapped to [0, 180], in degrees."""
    return ((torch.rad2deg(b - a) - degrees + 180) % 360 - 180).abs()


@pytest.mark.parametrize("gname", ["C8", "C16"])
def test_continuous_pose_follows_a_rotation_by_any_angle(gname):
    """Rotating the input by any angle shifts the pose read off the scores by that angle: exactly (to float error)
    for quarter turns, within a few degrees between grid points (median < 4, 90th percentile < 10,
    for an untrained canonicalizer on smooth shapes)."""
    from equiray.data import apply_view

    torch.manual_seed(0)
    model = CanonicalizedModel(torch.nn.Identity(), create_canonicalizer("equivariant", gname), pose="angle").eval()
    x = _blobs()
    with torch.no_grad():
        base = model.canonicalize(x).angle
        quarter = _angle_error(base, model.canonicalize(apply_view(x, "angle:90")).angle, 90)
        assert quarter.median() < 0.05 and quarter.quantile(0.9) < 0.2  # the scores permute exactly; atan2 of a
        # short 2-vector (an undecided canonicalizer) amplifies float error
        for deg in (22.5, 30.0, 45.0, 117.0):
            err = _angle_error(base, model.canonicalize(apply_view(x, f"angle:{deg}")).angle, deg)
            assert err.median() < 4.0 and err.quantile(0.9) < 10.0, (deg, err.median(), err.quantile(0.9))


def test_continuous_pose_is_not_fooled_by_a_non_symmetry():
    """The sensitivity twin: a C8 canonicalizer knows nothing of mirrors, so mirroring the input does not negate
    its pose (the check above would catch a pose that ignores the input)."""
    torch.manual_seed(0)
    model = CanonicalizedModel(torch.nn.Identity(), create_canonicalizer("equivariant", "C8"), pose="angle").eval()
    x = _blobs()
    with torch.no_grad():
        a, b = model.canonicalize(x).angle, model.canonicalize(x.flip(-1)).angle
    assert _angle_error(a, -b, 0).median() > 10.0


@pytest.mark.parametrize("gname", ["C4", "D4", "D8"])
def test_continuous_pose_model_is_invariant_and_reports_its_angle(gname):
    """Behind a continuous pose any backbone is invariant to the group's exact elements, mirrors included (D_n
    reads the mirror first); the backbone alone is not (the sensitivity twin)."""
    from equiray.models import create_model

    torch.manual_seed(0)
    g = get_group(gname)
    backbone = create_model("small_cnn").eval()
    model = CanonicalizedModel(backbone, create_canonicalizer("equivariant", gname), pose="angle").eval()
    x = _blobs(32)
    with torch.no_grad():
        y0, info = model.forward_with_info(x)
        assert info.angle is not None and info.angle.shape == (32,)
        assert torch.equal(info.degrees(g), torch.rad2deg(info.angle) % 360)
        for e in g.elements():
            if bool(g.is_exact(e)):
                torch.testing.assert_close(model(g.act(x, e)), y0, atol=3e-3, rtol=0)
        assert (backbone(g.act(x, 1)) - backbone(x)).abs().max() > 1e-2


def test_continuous_pose_trains_the_canonicalizer_through_the_rotation():
    """The angle is differentiable: the task loss alone reaches the canonicalizer's weights."""
    import torch.nn.functional as F

    from equiray.models import create_model

    torch.manual_seed(0)
    model = CanonicalizedModel(create_model("small_cnn"), create_canonicalizer("equivariant", "C8"), pose="angle")
    F.cross_entropy(model(_blobs(16)), torch.arange(16) % 10).backward()
    grads = [p.grad for p in model.canonicalizer.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0
    with pytest.raises(ValueError, match="invariant outputs"):
        CanonicalizedModel(torch.nn.Identity(), create_canonicalizer("equivariant", "C8"), output="dense", pose="angle")


def test_snapped_pose_takes_a_near_quarter_turn_exactly_and_leaves_the_rest():
    """Within the tolerance of a quarter turn the pose becomes that quarter turn (the input then reaches the backbone
    unresampled); outside it the pose is kept; a tolerance of 0 keeps every pose. The model snaps in eval mode
    only, and a snapping model stays invariant to quarter turns (the snap commutes with them)."""
    import math

    from equiray.canon.pose import Pose
    from equiray.models import create_model

    deg = torch.tensor([0.0, 4.0, -7.0, 95.0, 179.0, -178.0, 30.0, 60.0, -100.0, 135.0])
    pose = Pose(torch.deg2rad(deg), torch.zeros(10, dtype=torch.bool), torch.ones(10))
    got = torch.rad2deg(pose.snapped(8.0).angle)
    want = torch.tensor([0.0, 0.0, 0.0, 90.0, 180.0, 180.0, 30.0, 60.0, -100.0, 135.0])
    assert ((got - want + 180) % 360 - 180).abs().max() < 1e-4, got
    assert got.min() > -180 and got.max() <= 180
    assert pose.snapped(0.0) is pose
    assert not torch.signbit(pose.snapped(8.0).angle[2]) and float(pose.snapped(8.0).degrees()[2]) == 0.0
    far = torch.tensor([1, 2, 3, 6, 7, 8, 9])  # more than 3 degrees from a quarter turn
    torch.testing.assert_close(torch.rad2deg(pose.snapped(3.0).angle)[far], deg[far], atol=1e-4, rtol=0)

    torch.manual_seed(0)
    x = _blobs(32)
    model = CanonicalizedModel(torch.nn.Identity(), create_canonicalizer("equivariant", "C8"), pose="angle",
                               pose_snap=40.0).eval()
    with torch.no_grad():
        read = torch.rad2deg(model.canonicalize(x).angle)  # snapped as configured
        model.pose_snap = 0.0
        raw = torch.rad2deg(model.canonicalize(x).angle)
        near = ((raw / 90 - torch.round(raw / 90)) * 90).abs() < 40
        assert near.sum() >= 24 and (~near).any()
        on = (read / 90 - torch.round(read / 90)).abs() < 1e-5
        assert torch.equal(on, near) and torch.equal(read[~near], raw[~near])
        model.pose_snap = 40.0
        info = model.canonicalize(x)
        upright = near & (read.abs() < 1e-4)
        assert upright.any() and torch.equal(info.inputs[upright], x[upright])  # untouched, not resampled
        turned = near & ((read - 90).abs() < 1e-4)
        assert torch.equal(info.inputs[turned], torch.rot90(x[turned], -1, (-2, -1)))  # turned back exactly
        model.pose_snap = 0.0
        assert not torch.equal(model.canonicalize(x).inputs[upright], x[upright])  # the sensitivity twin
        model.train()
        model.pose_snap = 40.0
        trained = model.canonicalize(x).angle  # training reads the angle as it is
        assert (torch.rad2deg(trained) / 90 - torch.round(torch.rad2deg(trained) / 90)).abs().max() > 1e-2
        model.pose_snap = 0.0
        torch.testing.assert_close(model.canonicalize(x).angle, trained)
    backbone = create_model("small_cnn").eval()
    model = CanonicalizedModel(backbone, create_canonicalizer("equivariant", "C4"), pose="angle", pose_snap=10.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.rot90(x, 1, (-2, -1))), model(x), atol=3e-3, rtol=0)
    with pytest.raises(ValueError, match="pose_snap"):
        CanonicalizedModel(torch.nn.Identity(), create_canonicalizer("equivariant", "C8"), pose="angle", pose_snap=50)


def test_random_rotation_training_targets_the_applied_pose():
    """Training on randomly turned inputs: the draws are reproducible from the generator and mirror about half
    the images for O(2); the prior's target is the applied turn (the element nearest to it), which an untrained
    canonicalizer mostly misses (the identity rate then counts hits of that target); the loss reaches the
    canonicalizer."""
    from equiray.canon import CanonObjective, RandomRotations

    torch.manual_seed(0)
    x, y = _blobs(64), torch.arange(64) % 10
    turns = RandomRotations(torch.Generator().manual_seed(3), mirror=True)
    a, angle_a, mirror_a = turns(x)
    b, angle_b, mirror_b = RandomRotations(torch.Generator().manual_seed(3), mirror=True)(x)
    assert torch.equal(a, b) and torch.equal(angle_a, angle_b) and 16 < int(mirror_a.sum()) < 48
    model = CanonicalizedModel(create_model("small_cnn"), create_canonicalizer("equivariant", "D8"), pose="angle")
    step = CanonObjective(prior_weight=1.0, rotations=RandomRotations(torch.Generator().manual_seed(3), mirror=True))
    out = step(model.eval(), x, y)
    assert 0.0 <= float(out.metrics["identity_rate"]) < 0.5 and float(out.metrics["prior"]) > 0
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.canonicalizer.parameters())


def test_continuous_pose_prior_targets_the_angle_between_the_grid_points():
    """For a continuous pose the prior's target shares the applied angle between its two neighbouring rotations
    (on the applied mirror half), so scores that meet the target read the angle back within a degree; the
    element-pose prior keeps its one-hot target, whose angle is off by up to half a grid step (the sensitivity
    twin: what a one-hot target would teach a continuous pose)."""
    import math
    from types import SimpleNamespace

    from equiray.canon.pose import continuous_pose
    from equiray.canon.train import pose_prior

    g = get_group("D8")
    deg = torch.tensor([0.0, 11.25, 22.5, 30.0, 100.0, 350.0, 200.0, 44.0], dtype=torch.float64)
    mirrored = torch.tensor([False, False, True, False, True, False, False, True])
    angle = torch.deg2rad(deg).float()
    scores = torch.zeros(8, g.order, requires_grad=True)
    info = SimpleNamespace(scores=scores, angle=torch.zeros(8))
    prior, nearest = pose_prior(info, g, angle, mirrored)
    prior.backward()
    soft = (torch.softmax(scores.detach(), -1) - scores.grad * 8)  # CE's gradient: (softmax - target) / batch
    assert torch.allclose(soft.sum(-1), torch.ones(8), atol=1e-5)
    assert torch.equal(soft.argmax(-1) // 8, mirrored.long())  # all mass on the applied mirror half
    assert float(soft[1, 0]) == pytest.approx(0.75, abs=1e-5) and float(soft[1, 1]) == pytest.approx(0.25, abs=1e-5)
    assert float(soft[0, 0]) == pytest.approx(1.0, abs=1e-5)  # on the grid: the element itself
    read = continuous_pose(torch.log(soft.clamp_min(1e-12)), g)
    err = ((read.degrees().double() - deg + 180) % 360 - 180).abs()
    assert err.max() < 1.0 and torch.equal(read.mirrored, mirrored), err
    hard = continuous_pose(torch.log(F.one_hot(nearest, g.order).float().clamp_min(1e-12)), g)
    hard_err = ((hard.degrees().double() - deg + 180) % 360 - 180).abs()
    assert hard_err.max() > 10.0
    assert float(pose_prior(SimpleNamespace(scores=scores.detach(), angle=None), g, angle, mirrored)[0]) == \
        pytest.approx(float(F.cross_entropy(scores.detach(), nearest)))  # the element pose: one-hot, as before
    assert math.isfinite(float(prior))


def test_upright_share_leaves_that_share_of_images_upright_and_changes_no_other_draw():
    """``upright_share``: about that share of the images stay as they are (angle 0, not mirrored: the identity is
    their target); without it the draws are the ones every earlier run made from the same seed."""
    from equiray.canon import RandomRotations
    from equiray.errors import EquirayError

    x = _blobs(200)
    a, angle, mirrored = RandomRotations(torch.Generator().manual_seed(4), mirror=True, upright_share=0.5)(x)
    kept = angle == 0
    assert 70 < int(kept.sum()) < 130 and not mirrored[kept].any()
    assert torch.allclose(a[kept], x[kept], atol=1e-6)
    assert not torch.allclose(a[~kept][:5], x[~kept][:5], atol=1e-2)
    plain = RandomRotations(torch.Generator().manual_seed(4), mirror=True)(x)
    zero = RandomRotations(torch.Generator().manual_seed(4), mirror=True, upright_share=0.0)(x)
    assert all(torch.equal(p, z) for p, z in zip(plain, zero))
    with pytest.raises(EquirayError, match="upright_share"):
        RandomRotations(torch.Generator(), upright_share=1.0)


def test_pose_epochs_train_the_canonicalizer_alone_before_the_variant():
    """``pose_epochs``: the canonicalizer learns the applied pose first with the backbone untouched (weights and
    BatchNorm statistics), its pose loss falling; then the variant trains both as usual."""
    from equiray.canon import Variant, train_variant

    g = torch.Generator().manual_seed(0)  # one upright shape (a hook, its top bar to the right), noisy copies
    shape = torch.zeros(1, 28, 28)
    shape[:, 6:22, 12:16], shape[:, 6:10, 16:22] = 1.0, 1.0
    x = (shape * (0.6 + 0.4 * torch.rand(96, 1, 1, 1, generator=g)) + 0.1 * torch.rand(96, 1, 28, 28, generator=g))
    y = torch.arange(96) % 10
    torch.manual_seed(0)
    model = CanonicalizedModel(create_model("resnet8", num_classes=10), create_canonicalizer("equivariant", "C4"),
                               pose="angle")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    canon_before = [p.detach().clone() for p in model.canonicalizer.parameters()]
    unchanged = []

    def on_epoch(row):
        if row.get("pose_phase"):
            unchanged.append(all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items()))

    variant = Variant(name="v", kind="equivariant", group="C4", pose="angle", rotations="so2")
    rows = train_variant(model, variant, x, y, epochs=1, batch_size=32, lr=1e-3, canon_lr=3e-2, weight_decay=0.0,
                         pose_epochs=3, upright_share=0.25, on_epoch=on_epoch)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and [r.get("pose_phase") for r in rows] == [1.0] * 3 + [None]
    assert unchanged == [True, True, True]
    assert rows[2]["train_prior_loss"] < rows[0]["train_prior_loss"] - 0.1, [r["train_prior_loss"] for r in rows]
    assert any(not torch.equal(a, b) for a, b in zip(canon_before, model.canonicalizer.parameters()))
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())  # the variant's epoch
    assert all(p.requires_grad for p in model.backbone.parameters())


# ----------------------------------------------------------------------------------- upright backbone, frozen pose
def _quarter_model(gname: str = "C4", **kwargs) -> CanonicalizedModel:
    torch.manual_seed(0)
    return CanonicalizedModel(create_model("resnet8", num_classes=10), create_canonicalizer("equivariant", gname),
                              pose="angle", pose_snap=10.0, upright=create_model("resnet8", num_classes=10),
                              **kwargs).eval()


def test_upright_backbone_answers_for_untouched_inputs_and_the_fine_tuned_one_for_the_rest(gen):
    """Inputs the canonicalizer leaves as they are get the upright backbone's logits on the input itself; the
    others the fine-tuned backbone's on the input turned back; one batch mixes both. Sensitivity: without the
    upright backbone every input gets the fine-tuned one's answer (which differs), and in training mode too."""
    model = _quarter_model()
    x = torch.rand(16, 1, 28, 28, generator=gen)
    with torch.no_grad():
        logits, info = model.forward_with_info(x)
        keep = model.untouched(info)
        assert 0 < int(keep.sum()) < len(x), "the check needs both kinds in one batch"
        torch.testing.assert_close(logits[keep], model.upright(x[keep]))
        torch.testing.assert_close(logits[~keep], model.backbone(info.inputs[~keep]))
        assert (model.backbone(x[keep]) - logits[keep]).abs().max() > 1e-3
        model.train()
        assert not model.upright.training  # kept as it came, its BatchNorm statistics too
        train_logits, _ = model.forward_with_info(x)
        assert (train_logits[keep] - logits[keep]).abs().max() > 1e-3


def test_upright_backbone_round_trips_through_the_spec():
    """``build_variant(..., upright_backbone=True)`` keeps a copy of the pretrained backbone that the spec rebuilds
    and the state dict fills; the optimizer never sees it."""
    from equiray.canon import Variant, build_variant, variant_optimizer

    backbone = create_model("resnet8", num_classes=10)
    spec = {"name": "resnet8", "in_chans": 1, "num_classes": 10, "kwargs": {}}
    variant = Variant(name="v", kind="equivariant", group="C8", pose="angle", rotations="so2")
    model, mspec = build_variant(variant, spec, backbone.state_dict(), pose_snap=10, upright_backbone=True)
    assert mspec["kwargs"]["upright_backbone"] is True
    for a, b in zip(model.upright.state_dict().values(), backbone.state_dict().values()):
        torch.testing.assert_close(a, b)
    rebuilt = create_model(mspec["name"], **mspec["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # strict: the same modules
    opt = variant_optimizer(model, variant, lr=1e-3, canon_lr=1e-2, weight_decay=0.0)
    trained = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in model.upright.parameters()}


def test_freeze_pose_trains_the_backbone_alone_after_the_pose_epochs():
    """``freeze_pose``: the canonicalizer's weights and statistics stay as the pose epochs left them while the
    backbone trains on the inputs turned back; no gradient reaches the canonicalizer. Sensitivity: without it the
    canonicalizer keeps training."""
    from equiray.canon import Variant, train_variant

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.arange(64) % 10
    variant = Variant(name="v", kind="equivariant", group="C4", pose="angle", rotations="so2", prior_weight=10.0)
    after_pose = {}
    for freeze in (True, False):
        torch.manual_seed(0)
        model = CanonicalizedModel(create_model("resnet8", num_classes=10),
                                   create_canonicalizer("equivariant", "C4", batch_norm=True), pose="angle")
        backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
        state = {}

        def on_epoch(row, model=model, state=state):
            if row.get("pose_phase"):
                state.update({k: v.clone() for k, v in model.canonicalizer.state_dict().items()})

        train_variant(model, variant, x, y, epochs=2, batch_size=32, lr=1e-3, canon_lr=3e-2, weight_decay=0.0,
                      pose_epochs=1, freeze_pose=freeze, on_epoch=on_epoch)
        after_pose[freeze] = all(torch.equal(state[k], v) for k, v in model.canonicalizer.state_dict().items())
        assert any(not torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
        assert all(p.requires_grad for p in model.canonicalizer.parameters())
    assert after_pose == {True: True, False: False}


def test_one_cycle_schedule_warms_up_then_anneals_each_group_to_its_own_rate():
    """``lr_schedule="one_cycle"``: every parameter group rises to its own rate over the first 15% of the steps,
    then falls to near 0 by the last; ``constant`` leaves the rates alone (no hook); an unknown name is an error."""
    from equiray.canon import lr_scheduler

    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 3e-2}])
    assert lr_scheduler(opt, "constant", steps=100) is None
    step = lr_scheduler(opt, "one_cycle", steps=100)
    rates = []
    for i in range(100):
        rates.append([g["lr"] for g in opt.param_groups])
        opt.step()
        step(i)
    rates = torch.tensor(rates)
    peak = rates.argmax(0)
    assert (peak >= 13).all() and (peak <= 16).all()
    assert torch.allclose(rates.max(0).values, torch.tensor([1e-3, 3e-2]), rtol=1e-3)
    assert (rates[0] < rates.max(0).values / 10).all() and (rates[-1] < rates.max(0).values / 100).all()
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_scheduler(opt, "cosine", steps=10)


def test_one_cycle_changes_what_train_variant_learns():
    """The schedule reaches ``train_variant``: the same seed and data with ``one_cycle`` end at other weights than
    with ``constant`` (sensitivity), and the pose epochs are not scheduled (the canonicalizer after them is the
    same)."""
    from equiray.canon import Variant, train_variant

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.arange(64) % 10
    variant = Variant(name="v", kind="equivariant", group="C4", pose="angle", rotations="so2", prior_weight=10.0)
    backbones, poses = {}, {}
    for schedule in ("constant", "one_cycle"):
        torch.manual_seed(0)
        model = CanonicalizedModel(create_model("resnet8", num_classes=10),
                                   create_canonicalizer("equivariant", "C4", batch_norm=True), pose="angle")

        def on_epoch(row, model=model, schedule=schedule):
            if row.get("pose_phase"):
                poses[schedule] = [p.detach().clone() for p in model.canonicalizer.parameters()]

        train_variant(model, variant, x, y, epochs=2, batch_size=32, lr=1e-3, canon_lr=3e-2, weight_decay=0.0,
                      pose_epochs=1, freeze_pose=True, lr_schedule=schedule, on_epoch=on_epoch)
        backbones[schedule] = [p.detach().clone() for p in model.backbone.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(poses["constant"], poses["one_cycle"]))
    assert any(not torch.allclose(a, b) for a, b in zip(backbones["constant"], backbones["one_cycle"]))


def test_a_canonicalizer_built_under_inference_mode_answers_like_one_built_outside():
    # a model created or loaded inside torch.inference_mode has parameters without a version counter; the eval-time
    # caches (expanded filters, folded batch norm) must still key on them
    kwargs = dict(channels=4, layers=3, kernel_size=5, hidden_kernel_size=3, pool=2, input_size=14, batch_norm=True)
    torch.manual_seed(0)
    outside = create_canonicalizer("equivariant", "D8", **kwargs).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        torch.manual_seed(0)
        inside = create_canonicalizer("equivariant", "D8", **kwargs).eval()
        assert next(inside.parameters()).is_inference()
        got = inside.score(inside.prepare(x))[0]
        want = outside.score(outside.prepare(x))[0]
    torch.testing.assert_close(got, want)


def test_pose_objective_reads_the_backbone_on_a_sample_and_the_epoch_counts_those_labels():
    """The pose phase's reported accuracy: the backbone reads the first ``accuracy_sample`` canonical inputs (the
    same logits as on the whole batch's first rows), and :func:`train_epoch` scores them against their own labels,
    not the batch's."""
    from equiray.canon.train import PoseObjective, RandomRotations
    from equiray.train import Step, train_epoch

    torch.manual_seed(0)
    model = CanonicalizedModel(create_model("resnet8", num_classes=10), create_canonicalizer("equivariant", "C4"),
                               pose="angle").eval()
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10

    def step(sample: int) -> Step:
        with torch.no_grad():
            return PoseObjective(RandomRotations(torch.Generator().manual_seed(3)), accuracy_sample=sample)(model, x, y)

    part, whole = step(5), step(0)
    assert part.logits.shape == (5, 10) and torch.equal(part.labels, y[:5])
    assert whole.logits.shape == (12, 10) and torch.equal(whole.labels, y)
    assert torch.allclose(part.logits, whole.logits[:5], atol=1e-5)
    assert torch.equal(part.loss, whole.loss)  # the pose loss is the whole batch's either way

    # an objective whose logits answer class 0 on its first two rows only: those two rows are what it scores
    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.zero_(), head.bias.copy_(torch.tensor([1.0, 0.0]))

    def first_two(m, xb, yb):
        logits = m(xb)
        return Step(logits.sum() * 0, logits[:2], labels=yb[:2])

    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    batches = [(torch.zeros(4, 3), labels[:4]), (torch.zeros(4, 3), labels[4:])]
    stats = train_epoch(head, batches, torch.optim.SGD(head.parameters(), lr=0.0), objective=first_two)
    assert stats.accuracy == 1.0 and stats.samples == 8  # the batches' own labels would read 0.5


def test_fast_layout_trains_as_the_default_layout_and_hands_back_contiguous_weights():
    """``fast_layout`` (channels-last weights on a CPU while training) changes the speed, not the training: a
    variant trained inside it ends with the weights the default layout gives (to float tolerance), contiguous again
    (safetensors saves nothing else); inside, the conv weights are channels-last."""
    from safetensors.torch import save

    from equiray.canon import Variant, train_variant
    from equiray.train import fast_layout

    # float64: AdamW turns float32's rounding differences between the two layouts' kernels (1e-7) into steps of
    # up to the rate on near-zero gradients; in float64 any difference is the layout's doing
    x, y = torch.rand(48, 1, 28, 28, dtype=torch.float64), torch.arange(48) % 10
    variant = Variant(name="b", kind="none", group="C4", rotations="so2")

    def trained(layout: bool) -> nn.Module:
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10).double()
        if layout:
            train_variant(model, variant, x, y, epochs=2, batch_size=16, lr=1e-3, canon_lr=0.0, weight_decay=0.0)
        else:  # the same steps with the layout left alone
            import equiray.canon.train as ct
            keep = ct.fast_layout
            ct.fast_layout = lambda m, d: contextlib.nullcontext(m)
            try:
                train_variant(model, variant, x, y, epochs=2, batch_size=16, lr=1e-3, canon_lr=0.0, weight_decay=0.0)
            finally:
                ct.fast_layout = keep
        return model

    fast, plain = trained(True), trained(False)
    torch.manual_seed(0)
    start = create_model("resnet8", num_classes=10).double()
    moved = [k for k, v in plain.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert moved  # it trained
    for k, v in fast.state_dict().items():
        assert v.is_contiguous(), k
        assert torch.allclose(v, plain.state_dict()[k], atol=1e-9), k
    save(fast.state_dict())  # raises on a non-contiguous tensor
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    with fast_layout(fast, "cpu"):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous()
