"""The numerics every robust optimizer shares: row norms, the projection, the radii's Adam, and the base update's
AdamW/SGD kernels (fused, or ``torch._foreach_*`` where no fused kernel applies).

Conventions shared by FTP and TPGM
----------------------------------
*Rows.* The constraint is per output row: for a tensor with ``ndim >= 2`` (linear ``(out, in)``, conv
``(out, in, kh, kw)``, ...) row ``i`` is ``W[i]`` flattened over all remaining dimensions. A 1-D tensor (bias,
norm scale/shift) or a 0-D tensor is treated as a *single* row (the whole tensor), as the reference code does.

*Row norm.* ``n_i = sum |(W - W0)_i| + 1e-8`` (L1, the "MARS" norm of TPGM, with a small constant so that a row
that has not moved does not divide by zero). Projection: ``W0_i + min(1, gamma / n_i) * (W - W0)_i``; rows
with ``gamma / n_i >= 1`` are left *exactly* as the base optimizer put them (not recomputed as ``W0 + 1*c``,
which would round differently), so a projection that is inactive is bit-for-bit a no-op.

*Radius.* One scalar ``gamma`` per constrained tensor, clipped to ``[1e-8, max_i n_i]`` each time it is updated
(a radius above the largest row norm could never be active). The clip means a radius can lag behind row norms
that grow faster than its own Adam step (about ``mu`` per step), even with ``k = 0``: a large ``gamma_init``
alone does not switch the projection off for good (use :class:`~equiray.optim.FineTune` for that).

*Speed.* The base update runs PyTorch's fused AdamW/SGD kernels (``torch._fused_adamw_`` /
``torch._fused_sgd_``, what ``torch.optim.AdamW(fused=True)`` runs) on CPU/CUDA tensors of a floating dtype, and
``torch._foreach_*`` ops elsewhere; neither synchronises with the host.
"""
from __future__ import annotations

import torch

BASES = ("adamw", "sgd")
GAMMA_MIN = 1e-8          # lower clip of every radius (reference code: hardtanh(gamma, 1e-8, max norm))
NORM_EPS = 1e-8           # added to every row norm before dividing by it
RADIUS_BETAS = (0.9, 0.999)
RADIUS_EPS = 1e-8


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, -1)``: rows along dim 0 for ``ndim >= 2``, a single row for 1-D and 0-D tensors."""
    return t.reshape(t.shape[0] if t.dim() >= 2 else 1, -1)


def _row_shape(t: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-row vector of ``t`` against ``t``."""
    return (t.shape[0],) + (1,) * (t.dim() - 1) if t.dim() >= 2 else (1,) * t.dim()


def row_l1_norms(diff: torch.Tensor) -> torch.Tensor:
    """Per-row L1 norm ``n_i = sum_j |diff_ij| + 1e-8`` (the "MARS" norm of TPGM, Tian et al. CVPR 2023; the
    norm FTP's Algorithm 1 projects with). Rows: see the module docstring. Returns a 1-D tensor of length
    ``rows`` in ``diff``'s dtype."""
    return _row_view(diff).abs().sum(dim=1) + NORM_EPS


def _project_rows(p: torch.Tensor, anchor: torch.Tensor, c: torch.Tensor, scale: torch.Tensor) -> None:
    """In place: ``p_i <- anchor_i + scale_i * c_i`` for rows with ``scale_i < 1``; other rows keep ``p``.

    This is the Projection step of FTP (Algorithm 1) and TPGM's projection with ``scale = min(1, gamma/n)``.
    """
    s = scale.reshape(_row_shape(p))
    p.copy_(torch.where(s < 1, anchor + s * c, p))


def _soft_scale(gamma: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``min(1, gamma / n)`` per row (``gamma >= 1e-8 > 0``, so the lower clamp at 0 never acts), differentiable
    in ``gamma`` with the derivative from *below* at ``gamma / n = 1``: ``torch.clamp`` gives 0 there, so a radius
    equal to the largest row norm (TPGM's starting point) would never receive a gradient."""
    ratio = gamma / norms
    active = (ratio <= 1).detach()
    return torch.where(active, ratio, torch.ones_like(ratio))


def _adam_scalar(state: dict, grad: torch.Tensor, *, lr: float, prefix: str = "gamma") -> None:
    """One Adam step (Kingma & Ba 2015, Algorithm 1, with bias correction) on the 0-D tensor ``state[prefix]``
    using the moments ``state[prefix + '_exp_avg' / '_exp_avg_sq']`` and the counter ``state[prefix + '_step']``
    (betas ``(0.9, 0.999)``, eps ``1e-8``). Updates everything in place; no host synchronisation."""
    b1, b2 = RADIUS_BETAS
    state[f"{prefix}_step"] += 1
    t = state[f"{prefix}_step"]
    m, v = state[f"{prefix}_exp_avg"], state[f"{prefix}_exp_avg_sq"]
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    state[prefix].sub_(lr * m_hat / (v_hat.sqrt() + RADIUS_EPS))


def _clip_radius(gamma: torch.Tensor, norms: torch.Tensor) -> None:
    """In place: ``gamma <- clip(gamma, 1e-8, max_i n_i)`` (FTP Algorithm 1 / TPGM; ``norms >= 1e-8``)."""
    gamma.copy_(torch.minimum(gamma.clamp(min=GAMMA_MIN), norms.max()))


_FUSED_DEVICES = ("cpu", "cuda")     # devices whose tensors take torch's fused AdamW/SGD kernels
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _split_by_device_dtype(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[tuple[list[int], bool]]:
    """Indices of ``params`` grouped by (device, dtype), each with whether PyTorch's fused optimizer kernels
    take that group (CPU/CUDA, floating dtype, gradient of the same dtype). One group in the usual case."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, grads[i].dtype == p.dtype), []).append(i)
    return [(idx, dev.type in _FUSED_DEVICES and dtype in _FUSED_DTYPES and same)
            for (dev, dtype, same), idx in groups.items()]


def _fused_adamw(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict], group: dict) -> None:
    """AdamW through ``torch._fused_adamw_`` (one device and dtype). Its step counts are float32 tensors on the
    device, made here from the Python ints of the state (one ``torch.full`` per distinct count, no sync)."""
    beta1, beta2 = group["betas"]
    device = ps[0].device
    counts: dict[int, torch.Tensor] = {}
    steps = []
    for st in sts:
        t = counts.get(st["step"])
        if t is None:
            t = counts[st["step"]] = torch.full((), float(st["step"]), dtype=torch.float32, device=device)
        steps.append(t)
    torch._fused_adamw_(ps, gs, [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts], [], steps,
                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                        eps=group["eps"], amsgrad=False, maximize=False)


def _foreach_adamw(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict], group: dict) -> None:
    """AdamW with ``torch._foreach_*`` ops: the recipe of ``torch.optim.AdamW(foreach=True)``."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    exp_avgs = [st["exp_avg"] for st in sts]
    exp_avg_sqs = [st["exp_avg_sq"] for st in sts]
    if wd != 0:
        torch._foreach_mul_(ps, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, 1 - beta2)
    neg_step_size = [-lr / (1 - beta1 ** st["step"]) for st in sts]
    bias_correction2_sqrt = [(1 - beta2 ** st["step"]) ** 0.5 for st in sts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, exp_avgs, denom, neg_step_size)


def _fused_sgd(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict], group: dict) -> None:
    """SGD through ``torch._fused_sgd_`` (one device and dtype); tensors whose momentum buffer does not exist
    yet go in a call of their own (``is_first_step``: the buffer starts as the gradient)."""
    kw = {"weight_decay": group["weight_decay"], "momentum": group["momentum"], "lr": group["lr"],
          "dampening": group["dampening"], "nesterov": group["nesterov"], "maximize": False}
    if group["momentum"] == 0:
        torch._fused_sgd_(ps, gs, [], is_first_step=False, **kw)
        return
    first = [i for i, st in enumerate(sts) if st.get("momentum_buffer") is None]
    if first:
        for i in first:
            sts[i]["momentum_buffer"] = torch.empty_like(gs[i])
        torch._fused_sgd_([ps[i] for i in first], [gs[i] for i in first],
                          [sts[i]["momentum_buffer"] for i in first], is_first_step=True, **kw)
    seen = set(first)
    rest = [i for i in range(len(ps)) if i not in seen]
    if rest:
        torch._fused_sgd_([ps[i] for i in rest], [gs[i] for i in rest],
                          [sts[i]["momentum_buffer"] for i in rest], is_first_step=False, **kw)


def _foreach_sgd(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict], group: dict) -> None:
    """SGD with ``torch._foreach_*`` ops: the recipe of ``torch.optim.SGD(foreach=True)``, gradients untouched."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    d_p = torch._foreach_add(gs, ps, alpha=wd) if wd != 0 else gs
    if momentum != 0:
        bufs, old, d_old = [], [], []
        for st, d in zip(sts, d_p):
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.clone(d).detach()
            else:
                old.append(buf)
                d_old.append(d)
            bufs.append(buf)
        if old:
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, d_old, alpha=1 - group["dampening"])
        d_p = torch._foreach_add(d_p, bufs, alpha=momentum) if group["nesterov"] else bufs
    torch._foreach_add_(ps, d_p, alpha=-lr)
