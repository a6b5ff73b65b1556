"""Robust fine-tuning optimizers: FTP, TPGM, L2-SP and plain fine-tuning behind one interface (plain PyTorch).

All four keep a pretrained model close to where it started while it learns a new task:

* :class:`FTP` -- Fast Trainable Projection (Tian, Liu, Smith & Kira, "Fast Trainable Projection for Robust
  Fine-Tuning", NeurIPS 2023, Algorithm 1 / Fig. 1a). Every step: an unconstrained base-optimizer update (UGD),
  a radius update that reuses the gradient already computed for that step (ProjUpdate), and a projection of
  each weight row back into an L1 ball of learned radius around the pretrained weights (Projection). No extra
  forward or backward pass.
* :class:`TPGM` -- Trainable Projected Gradient Method (Tian et al., "Trainable Projected Gradient Method for
  Robust Fine-tuning", CVPR 2023), FTP's bi-level predecessor: the same projection, but the radii are fitted
  by gradient descent on a held-out batch, which costs extra forward/backward passes every time
  :meth:`TPGM.project` runs.
* :class:`L2SP` -- L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with
  Convolutional Networks", ICML 2018): a penalty ``alpha/2 ||W - W0||^2`` on pretrained weights plus
  ``beta/2 ||W_head||^2`` on the new head, added to the loss through :meth:`L2SP.regularizer`.
* :class:`FineTune` -- the base optimizer alone (AdamW or SGD), the reference every method is compared to.

Every class is a :class:`torch.optim.Optimizer` that implements its base update (AdamW with decoupled weight
decay, or SGD with optional momentum/Nesterov, numerically the same recipe as ``torch.optim.AdamW`` /
``torch.optim.SGD``) itself, so that *all* state -- base-optimizer moments, pretrained anchors, radii, the
radii's own Adam moments, FTP's previous direction -- lives in ``optimizer.state[param]``: ``state_dict()`` /
``load_state_dict()`` resume bit-identically, and ``param_groups`` hold only hyperparameters (floats, bools,
strings, parameter names), never tensors.

*Speed.* ``step()`` works on a whole parameter group at a time, with no host synchronisation: the base update
runs PyTorch's fused AdamW/SGD kernels (``torch._fused_adamw_`` / ``torch._fused_sgd_``, what
``torch.optim.AdamW(fused=True)`` runs; ``torch._foreach_*`` ops on devices without them), and FTP's extra work
is four passes over each constrained tensor plus a few dozen small vector ops for all radii of a group. Per-tensor
state stays per tensor: FTP's ``gamma`` / ``gamma_exp_avg`` / ``gamma_exp_avg_sq`` are 0-D tensors in
``optimizer.state[param]`` that are views of one shared ``(3, T)`` tensor per group (rebuilt transparently after
``load_state_dict`` or a hand-made change), and ``prev_n`` slices of one vector of row norms.

A training loop can treat all methods alike::

    opt = make_optimizer("ftp", model, lr=1e-4, weight_decay=0.05)          # head auto-excluded
    loss = F.cross_entropy(model(x), y) + opt.regularizer(model)            # 0 except for L2-SP
    opt.zero_grad(); loss.backward(); opt.step()
    if isinstance(opt, TPGM) and step % 50 == 0:                            # TPGM only
        opt.project(model, next(val_batches), F.cross_entropy)

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
alone does not switch the projection off for good (use :class:`FineTune` for that).

*Names.* Pass ``model.named_parameters()`` (pairs) to use ``exclude=`` patterns (``fnmatch``, e.g.
``("head.*", "fc.*")``): excluded tensors -- the newly initialized head -- get the plain base update and no
anchor/radius state. Alternatively pass parameter groups (dicts) with a ``"constrained": bool`` flag (missing
means ``True``), or bare tensors (all constrained).
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from equiray.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["FTP", "TPGM", "L2SP", "FineTune", "RobustOptimizer", "make_optimizer", "METHODS", "FTP_STATE_KEYS",
           "TPGM_STATE_KEYS", "L2SP_STATE_KEYS", "DEFAULT_HEAD_PATTERNS", "row_l1_norms"]

BASES = ("adamw", "sgd")
GAMMA_MIN = 1e-8          # lower clip of every radius (reference code: hardtanh(gamma, 1e-8, max norm))
NORM_EPS = 1e-8           # added to every row norm before dividing by it
RADIUS_BETAS = (0.9, 0.999)
RADIUS_EPS = 1e-8

#: Per-parameter state keys each method adds on top of the base optimizer's
#: (``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW; ``step``, ``momentum_buffer`` for SGD).
FTP_STATE_KEYS = ("anchor", "gamma", "gamma_exp_avg", "gamma_exp_avg_sq", "gamma_step", "prev_c", "prev_n")
TPGM_STATE_KEYS = ("anchor", "gamma", "gamma_exp_avg", "gamma_exp_avg_sq", "gamma_step")
L2SP_STATE_KEYS = ("anchor",)

#: Patterns ``make_optimizer`` tries when ``exclude=None`` (those that match something are used).
DEFAULT_HEAD_PATTERNS = ("head.*", "fc.*", "classifier.*", "head", "fc", "classifier")


# ----------------------------------------------------------------------------------------------- helpers

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
_SCRATCH_DEVICES = ("cpu",)           # FTP: tensor-by-tensor passes through a scratch buffer (else foreach ops)


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


def _few(names: Sequence[str], k: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:k])
    return f"{shown}{', ...' if len(names) > k else ''} ({len(names)} in all)"


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _split_named(named: Sequence[tuple[str, torch.Tensor]], exclude: Sequence[str], *, method: str
                 ) -> list[dict[str, Any]]:
    """Two parameter groups from ``(name, tensor)`` pairs: constrained (not matching ``exclude``) and excluded.

    Raises ``ConfigError`` when a pattern matches nothing (most often a typo or another model's head name)."""
    names = [n for n, _ in named]
    unmatched = [pat for pat in exclude if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ConfigError(f"{method}: exclude pattern(s) {unmatched} match no parameter name; parameter names "
                          f"are e.g. {_few(names)}. Patterns are fnmatch-style and match whole names, "
                          f"e.g. 'head.*' for 'head.weight' and 'head.bias'.")
    kept = [(n, p) for n, p in named if not _match(n, exclude)]
    dropped = [(n, p) for n, p in named if _match(n, exclude)]
    groups = []
    if kept:
        groups.append({"params": kept, "constrained": True})
    if dropped:
        groups.append({"params": dropped, "constrained": False})
    log.debug("%s: constraining %d tensors, excluding %s", method, len(kept), [n for n, _ in dropped])
    return groups


def _is_named_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)


# ------------------------------------------------------------------------------------------ base class

class RobustOptimizer(torch.optim.Optimizer):
    """Shared machinery: parameter parsing, hyperparameter validation, the AdamW/SGD base update, anchors.

    Subclasses set ``method`` (its name in :func:`make_optimizer`) and ``_constrains`` (whether constrained
    tensors get an anchor, and whether "nothing left to constrain" is an error), and extend ``step``.
    """

    method = "base"
    _constrains = False

    def __init__(self, params, *, base: str, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, momentum: float, dampening: float, nesterov: bool, exclude: Sequence[str],
                 extra: dict[str, Any]):
        if isinstance(exclude, str):
            exclude = (exclude,)
        exclude = tuple(exclude)
        if isinstance(params, torch.Tensor):
            raise ConfigError(f"{self.method}: params must be an iterable (e.g. model.named_parameters()), "
                              "not a single tensor")
        items = list(params)
        if not items:
            raise ConfigError(f"{self.method}: got an empty parameter list")
        if all(isinstance(x, dict) for x in items):
            if exclude:
                raise ConfigError(f"{self.method}: exclude= works with (name, parameter) pairs; with parameter "
                                  "groups, put the excluded tensors in a group with 'constrained': False")
            groups = [dict(g) for g in items]
        elif all(_is_named_pair(x) for x in items):
            groups = _split_named(items, exclude, method=self.method)
        elif all(isinstance(x, torch.Tensor) for x in items):
            if exclude:
                raise ConfigError(f"{self.method}: exclude= needs parameter names; pass model.named_parameters() "
                                  "instead of model.parameters()")
            groups = [{"params": items}]
        else:
            raise ConfigError(f"{self.method}: params must be all (name, tensor) pairs, all tensors or all "
                              f"parameter-group dicts; got a mix ({sorted({type(x).__name__ for x in items})})")
        defaults = dict(base=base, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        momentum=momentum, dampening=dampening, nesterov=nesterov, constrained=True, **extra)
        super().__init__(groups, defaults)
        if self._constrains and not any(g["constrained"] and g["params"] for g in self.param_groups):
            raise ConfigError(f"{self.method}: no parameter is left to constrain (exclude={list(exclude)} or "
                              "'constrained': False took them all); use narrower exclude patterns, or "
                              "make_optimizer('finetune', ...) for unconstrained fine-tuning")

    # -- groups and state ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus validation; constrained tensors get their anchor
        (a copy of their current value) and the method's initial state here, i.e. when the optimizer is built.
        ``(name, tensor)`` pairs become tensors plus a ``"param_names"`` list (as torch >= 2.6 does itself)."""
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        if params is not None and not isinstance(params, (set, frozenset)):
            params = list(params)
            if params and all(_is_named_pair(x) for x in params):
                param_group.setdefault("param_names", [n for n, _ in params])
                params = [p for _, p in params]
            param_group["params"] = params
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if self._constrains and group["constrained"]:
            for p in group["params"]:
                state = self.state[p]
                state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
                self._init_constrained_state(p, state, group)

    def _init_constrained_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Hook: per-tensor state beyond the anchor, created with the optimizer."""

    def _validate_group(self, g: dict[str, Any]) -> None:
        m = self.method
        if g["base"] not in BASES:
            raise ConfigError(f"{m}: base must be one of {list(BASES)}, got {g['base']!r}")
        if not isinstance(g["constrained"], bool):
            raise ConfigError(f"{m}: a parameter group's 'constrained' must be True or False, "
                              f"got {g['constrained']!r}")
        for key in ("lr", "weight_decay", "eps", "momentum", "dampening"):
            if not (isinstance(g[key], (int, float)) and g[key] >= 0 and math.isfinite(g[key])):
                raise ConfigError(f"{m}: {key} must be a finite number >= 0, got {g[key]!r}")
        b = g["betas"]
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ConfigError(f"{m}: betas must be two numbers in [0, 1), got {b!r}")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ConfigError(f"{m}: nesterov=True needs momentum > 0 and dampening = 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for g in self.param_groups:
            g.setdefault("constrained", True)
            g.setdefault("nesterov", False)
            g.setdefault("dampening", 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` on a deep copy, so that loading the live ``state_dict()``
        of another optimizer never shares (and later mutates) its tensors. Replaces all state, anchors
        included: the anchors of the checkpoint win over the ones taken when this optimizer was built."""
        super().load_state_dict(copy.deepcopy(state_dict))

    # -- the base update -------------------------------------------------------------------------------

    @staticmethod
    def _base_update(params: list[torch.Tensor], grads: list[torch.Tensor], group: dict, states: list[dict]
                     ) -> None:
        """In place, for all tensors of one group at once: one AdamW step (Loshchilov & Hutter 2019,
        Algorithm 2; decoupled weight decay) or one SGD step (coupled L2 weight decay, momentum with dampening,
        optional Nesterov) -- the recipes of ``torch.optim.AdamW`` / ``torch.optim.SGD``. Leaves the gradients
        untouched. This is FTP's "UGD" step.

        Tensors on CPU/CUDA in a floating dtype go through PyTorch's fused kernels (``torch._fused_adamw_`` /
        ``torch._fused_sgd_``, what ``torch.optim.AdamW(fused=True)`` / ``SGD(fused=True)`` run: one pass over
        each tensor); others through ``torch._foreach_*`` ops (the ``foreach=True`` recipe). Both agree with
        the single-tensor recipe up to rounding; step counts stay Python ints in the state (no host sync)."""
        for g in grads:
            if g.is_sparse:
                raise RuntimeError("sparse gradients are not supported; use dense embeddings")
        for st in states:
            st["step"] = st.get("step", 0) + 1
        adamw = group["base"] == "adamw"
        if adamw:
            for p, st in zip(params, states):
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for idx, fused in _split_by_device_dtype(params, grads):
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            sts = [states[i] for i in idx]
            if adamw:
                (_fused_adamw if fused else _foreach_adamw)(ps, gs, sts, group)
            else:
                (_fused_sgd if fused else _foreach_sgd)(ps, gs, sts, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step on every tensor that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            self._base_update(params, grads, group, states)
            self._after_base_update(params, grads, group, states)
        self._after_step()
        return loss

    def _after_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                           states: list[dict]) -> None:
        """Hook called right after the base update of one group's tensors that have a gradient (``grads`` are
        the gradients at the old weights)."""

    def _after_step(self) -> None:
        """Hook called once per ``step()`` after all tensors were updated."""

    # -- uniform extras --------------------------------------------------------------------------------

    def _first_param(self) -> torch.Tensor:
        return next(p for g in self.param_groups for p in g["params"])

    def regularizer(self, model: nn.Module | None = None) -> torch.Tensor:
        """The term to add to the task loss: a 0-D zero here (only :class:`L2SP` has one), on the device and
        in the dtype of the first parameter, so ``loss + opt.regularizer(model)`` works for every method.
        ``model`` is accepted for a uniform call; the tensors come from the optimizer's own groups."""
        p = self._first_param()
        return torch.zeros((), device=p.device, dtype=p.dtype)

    def _anchor(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        anchor = state.get("anchor")
        if anchor is None:
            raise RuntimeError(f"{self.method}: a constrained tensor of shape {tuple(p.shape)} has no anchor in the "
                               "optimizer state; was a state_dict from another method (or a plain torch "
                               "optimizer) loaded? Build the optimizer afresh from the pretrained weights instead")
        return anchor

    def _constrained(self):
        """``(group, param, state)`` for every constrained tensor that has an anchor."""
        for g in self.param_groups:
            if g["constrained"]:
                for p in g["params"]:
                    st = self.state.get(p)
                    if st is not None and "anchor" in st:
                        yield g, p, st


# --------------------------------------------------------------------------------------------- methods

class FineTune(RobustOptimizer):
    """Plain fine-tuning: AdamW (decoupled weight decay) or SGD (momentum, Nesterov optional), nothing else.

    Same interface and state layout as the robust methods (``regularizer`` returns 0), so a comparison changes
    one name. ``exclude``/``"constrained"`` are accepted and validated but change nothing. No anchors are kept.
    """

    method = "finetune"
    _constrains = False

    def __init__(self, params, *, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, exclude: Sequence[str] = ()):
        super().__init__(params, base=base, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, exclude=exclude, extra={})


class FTP(RobustOptimizer):
    """Fast Trainable Projection (Tian, Liu, Smith & Kira, NeurIPS 2023, Algorithm 1) on top of AdamW or SGD.

    For each constrained tensor ``W`` with anchor ``W0`` (its value when this optimizer was built) and radius
    ``gamma``, one :meth:`step` does, with the gradient ``g_t = dL/dW`` the training loop already computed:

    1. UGD: the base optimizer's update proposes ``W~ = W_t - d_t``; ``c_t = W~ - W0``; row norms ``n_t``.
    2. ProjUpdate (skipped on a tensor's first step, there is no ``c_{t-1}`` yet): since
       ``W_t = W0 + gamma/n_{t-1} * c_{t-1}`` on projected rows, ``dL/dgamma = sum_i <g_t, c_{t-1}>_i / n_{t-1,i}``;
       a positive value (a push to *shrink* the radius) is multiplied by ``k`` ("positive gradient
       annealing"; with ``k = 0`` only the clip below can shrink the radius); then one Adam step of size ``mu``
       on ``gamma``.
       ``gamma`` is then clipped to ``[1e-8, max_i n_{t,i}]``. On the first step ``gamma`` stays ``gamma_init``.
    3. Projection: ``W_{t+1,i} = W0_i + min(1, gamma / n_{t,i}) * c_{t,i}`` row by row.

    Tensors in excluded groups (``exclude=`` patterns, or ``"constrained": False``) get step 1 only. Memory: a
    constrained tensor keeps two copies of itself (``anchor``, ``prev_c``) on top of the base optimizer's state;
    on CPU, ``prev_c`` is overwritten in place each step (``state_dict()`` returns live tensors, as PyTorch's
    optimizers do: save or copy it before stepping on), and one scratch buffer the size of the largest
    constrained tensor is shared by all of them.

    Args:
        params: ``model.named_parameters()`` (then ``exclude`` applies), parameter groups with a
            ``"constrained"`` flag (default ``True``) and any per-group override of the keywords below, or bare
            tensors (all constrained).
        base: ``"adamw"`` or ``"sgd"`` (per group).
        lr, weight_decay, betas, eps: the base optimizer's (AdamW: decoupled decay, like ``torch.optim.AdamW``;
            SGD: L2 added to the gradient, like ``torch.optim.SGD``).
        momentum, dampening, nesterov: SGD only.
        k: positive-gradient annealing factor in ``[0, 1]`` (per group).
        mu: learning rate of the radius' Adam (per group); its betas/eps are fixed at ``(0.9, 0.999)``/``1e-8``.
        gamma_init: initial radius (per group, read when the optimizer is built; later changes to the group
            value do not touch existing state). The default ``1e-8`` pins the first step to the anchor.
        exclude: fnmatch patterns of names to leave unconstrained (needs named parameters).

    Differences from the public reference code (GT-RIPL/FTP), all deliberate: every piece of state (anchor,
    ``gamma``, its Adam moments and step count, ``c_{t-1}``, ``n_{t-1}``) is in ``self.state[param]`` instead of
    Python lists indexed by call order, so ``state_dict()`` round trips and tensors without a gradient on some
    step do not shift the bookkeeping; the radius' Adam counts its own steps (the reference reuses the global
    step, which is already 2 at the first radius update); anchors are not kept in ``param_groups``.

    Raises:
        ConfigError (a ``ValueError``): bad hyperparameters (``k`` outside ``[0, 1]``, ``gamma_init <= 0``, ...),
        an ``exclude`` pattern that matches nothing, or nothing left to constrain.
    """

    method = "ftp"
    _constrains = True

    def __init__(self, params, *, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, k: float = 1.0, mu: float = 1e-2,
                 gamma_init: float = 1e-8, exclude: Sequence[str] = ()):
        super().__init__(params, base=base, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, exclude=exclude,
                         extra=dict(k=k, mu=mu, gamma_init=gamma_init))

    def _validate_group(self, g: dict[str, Any]) -> None:
        super()._validate_group(g)
        if not (isinstance(g["k"], (int, float)) and 0.0 <= g["k"] <= 1.0):
            raise ConfigError(f"ftp: k (positive-gradient annealing factor) must be in [0, 1], got {g['k']!r}; "
                              "k=1 is plain Adam on the radius, k=0 ignores every push to shrink it")
        if not (isinstance(g["mu"], (int, float)) and g["mu"] >= 0 and math.isfinite(g["mu"])):
            raise ConfigError(f"ftp: mu (radius learning rate) must be a finite number >= 0, got {g['mu']!r}")
        if not (isinstance(g["gamma_init"], (int, float)) and g["gamma_init"] > 0):
            raise ConfigError(f"ftp: gamma_init must be > 0, got {g['gamma_init']!r}")

    def _init_constrained_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        z = dict(device=p.device, dtype=p.dtype)
        state["gamma"] = torch.full((), float(group["gamma_init"]), **z)
        state["gamma_exp_avg"] = torch.zeros((), **z)
        state["gamma_exp_avg_sq"] = torch.zeros((), **z)
        state["gamma_step"] = 0

    def _after_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                           states: list[dict]) -> None:
        """FTP Algorithm 1, ProjUpdate and Projection, for all of a constrained group's tensors at once (``params``
        hold ``W~`` = UGD's proposal, ``grads`` = dL/dW at ``W_t``). No host synchronisation, no extra
        forward/backward pass. Tensors are handled in buckets of one device, dtype and radius step count (one
        bucket in the usual case), see :meth:`_ftp_bucket`."""
        if not group["constrained"]:
            return
        buckets: dict[tuple, list[int]] = {}
        for i, (p, st) in enumerate(zip(params, states)):
            self._anchor(p, st)
            if "gamma" not in st:
                self._init_constrained_state(p, st, group)
            prev = "prev_c" in st
            buckets.setdefault((p.device, p.dtype, prev, st["gamma_step"] if prev else None), []).append(i)
        for (_, _, prev, _), idx in buckets.items():
            if len(idx) == len(params):
                self._ftp_bucket(group, params, grads, states, prev)
            else:
                self._ftp_bucket(group, [params[i] for i in idx], [grads[i] for i in idx],
                                 [states[i] for i in idx], prev)

    def _ftp_bucket(self, group: dict, ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict],
                    prev: bool) -> None:
        """ProjUpdate (if ``prev``: every tensor has ``c_{t-1}``) and Projection for tensors of one device and
        dtype with the same radius step count, vectorised: elementwise work in ``torch._foreach_*`` ops (on CPU
        per multi-row tensor into a scratch buffer, which moves less memory), per-row sums per multi-row tensor
        and in one ``segment_reduce`` over the concatenated single-row tensors, the radii's Adam, clip and the
        projection scales on one vector of all rows / all radii of the bucket. Same arithmetic as the
        per-tensor formulas in the class docstring, up to summation order; a row whose scale is 1 is left
        bit-for-bit as the base update put it (``lerp`` with weight 0)."""
        lay = self._ftp_layout(ps)
        if lay.order is not None:
            order = lay.order
            ps, gs, sts = [ps[i] for i in order], [gs[i] for i in order], [sts[i] for i in order]
        nm = lay.nm
        anchors = [st["anchor"] for st in sts]
        radii = self._radius_block(ps, sts)                          # gamma, m, v of every tensor: one (3, T)
        olds = [st["prev_c"] for st in sts] if prev else None
        # multi-row tensors: per-row <g_t, c_{t-1}> (ProjUpdate), c_t = W~ - W0 and per-row sum |c_t|
        if prev and lay.cpu:        # tensor by tensor (its memory still in cache), c_t into c_{t-1}'s memory
            dots_m, l1_m = lay.cpu_pass(gs, olds, ps, anchors)
            cs = olds[:nm] + list(torch._foreach_sub(ps[nm:], anchors[nm:]))   # (single-row c_{t-1} kept)
        else:
            dots_m = lay.multi_dots(gs, olds) if prev else None
            cs = list(torch._foreach_sub(ps, anchors))
            l1_m = lay.multi_l1(cs)
        if prev:                                                     # ProjUpdate: dL/dgamma per tensor
            rowdots = lay.row_sums(dots_m,
                                   lay.cat_singles(gs).mul_(lay.cat_singles(olds)) if lay.ns else None)
            dgamma = lay.per_tensor_sums(rowdots / radii.prev_n(sts))
            dgamma = torch.where(dgamma > 0, dgamma * group["k"], dgamma)
        n = lay.row_sums(l1_m,
                         lay.cat_singles(cs).abs_() if lay.ns else None).add_(NORM_EPS)   # n_t, all rows
        gam = radii.gamma
        if prev:                                                     # Adam on the radii, then the clip
            t = sts[0]["gamma_step"] + 1
            for st in sts:
                st["gamma_step"] = t
            b1, b2 = RADIUS_BETAS
            m, v = radii.exp_avg, radii.exp_avg_sq
            m.mul_(b1).add_(dgamma, alpha=1 - b1)
            v.mul_(b2).addcmul_(dgamma, dgamma, value=1 - b2)
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            gam.sub_(group["mu"] * m_hat / (v_hat.sqrt() + RADIUS_EPS))
            torch.minimum(gam.clamp_(min=GAMMA_MIN), lay.per_tensor_max(n), out=gam)
        # Projection: W <- W0 + min(1, gamma/n) * c row by row, as W.lerp_(W0, 1 - min(1, gamma/n))
        weight = torch.rsub((lay.expand_rows(gam) / n).clamp_(max=1.0), 1.0)
        torch._foreach_lerp_(ps, anchors, lay.split_rows(weight))
        n_rows = n.split(lay.rows)
        for st, c, n_i in zip(sts, cs, n_rows):
            st["prev_c"], st["prev_n"] = c, n_i
        radii.keep_prev_n(n, n_rows)

    def _ftp_layout(self, ps: list[torch.Tensor]) -> _RowLayout:
        """The (cached) :class:`_RowLayout` of tensors of these shapes, device and dtype."""
        cache = self.__dict__.setdefault("_ftp_layouts", {})
        device, dtype = ps[0].device, ps[0].dtype
        key = (device, dtype, tuple(p.shape for p in ps))
        lay = cache.get(key)
        if lay is None:
            if len(cache) >= 64:
                cache.clear()
            lay = cache[key] = _RowLayout([p.shape for p in ps], device, dtype)
        if lay.cpu and lay.nm:      # one scratch buffer per device and dtype, as large as the largest tensor
            scratch = self.__dict__.setdefault("_ftp_scratch", {})
            buf = scratch.get((device, dtype))
            if buf is None or buf.numel() < max(lay.numels):
                buf = scratch[(device, dtype)] = torch.empty(max(lay.numels), dtype=dtype, device=device)
            lay.use_scratch(buf)
        return lay

    def _radius_block(self, ps: list[torch.Tensor], sts: list[dict]) -> _RadiusBlock:
        """The (cached) :class:`_RadiusBlock` of these tensors, its views checked against their state."""
        cache = self.__dict__.setdefault("_ftp_blocks", {})
        key = tuple(map(id, ps))
        block = cache.get(key)
        if block is None or not block.owns(sts):
            if block is None and len(cache) >= 64:
                cache.clear()
            block = cache[key] = _RadiusBlock(sts)
        return block


class _RowLayout:
    """Where the rows of a list of tensors go when all their rows are laid out in one vector: multi-row tensors
    (``ndim >= 2``, ``shape[0]`` rows) first, then single-row ones (1-D and 0-D: one row each), in their order.
    Holds the index tensors (on the device, made once per layout) that turn per-element / per-row results
    into per-row / per-tensor ones without a Python loop over single-row tensors."""

    def __init__(self, shapes: list[torch.Size], device: torch.device, dtype: torch.dtype):
        multi = [i for i, s in enumerate(shapes) if len(s) >= 2]
        single = [i for i, s in enumerate(shapes) if len(s) < 2]
        order = multi + single
        self.order = None if order == list(range(len(shapes))) else order
        shapes = [shapes[i] for i in order]
        self.nm, self.ns = len(multi), len(single)
        self.dims = [tuple(range(1, len(s))) for s in shapes[:self.nm]]
        self.wshapes = [(s[0],) + (1,) * (len(s) - 1) for s in shapes[:self.nm]]
        self.rows = [s[0] if len(s) >= 2 else 1 for s in shapes]
        self.zero = [len(s) == 0 for s in shapes[self.nm:]]
        self.zero_d = any(self.zero)
        as_index = {"dtype": torch.long, "device": device}
        self.single_len = (torch.tensor([math.prod(s) for s in shapes[self.nm:]], **as_index) if self.ns else None)
        self.cpu = device.type in _SCRATCH_DEVICES
        self.numels = [math.prod(s) for s in shapes[:self.nm]]
        self.shapes = shapes[:self.nm]
        self.scratch: list[torch.Tensor] = []
        self._scratch_buf: torch.Tensor | None = None
        if self.nm:
            self.rows_t = torch.tensor(self.rows, **as_index)
            self.seg = torch.repeat_interleave(torch.arange(len(shapes), **as_index), self.rows_t,
                                               output_size=sum(self.rows))

    def use_scratch(self, buf: torch.Tensor) -> None:
        """Point :attr:`scratch` (one view per multi-row tensor, shaped like it) at the start of ``buf``."""
        if self._scratch_buf is not buf:
            self._scratch_buf = buf
            self.scratch = [buf[:k].view(s) for k, s in zip(self.numels, self.shapes)]

    def cat_singles(self, ts: list[torch.Tensor]) -> torch.Tensor:
        """The single-row tensors of ``ts`` (in layout order) flattened into one 1-D tensor."""
        ts = ts[self.nm:]
        return torch.cat([t.reshape(-1) for t in ts] if self.zero_d else ts)

    def cpu_pass(self, gs: list[torch.Tensor], olds: list[torch.Tensor], ps: list[torch.Tensor],
                 anchors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """CPU, multi-row tensors, one at a time: per-row ``<g, c_{t-1}>``, then ``c_t = W~ - W0`` written over
        ``c_{t-1}``, then per-row ``sum |c_t|`` (products and ``|c_t|`` go through the scratch buffer)."""
        dots, l1 = [], []
        for g, c, p, a, s, d in zip(gs, olds, ps, anchors, self.scratch, self.dims):
            dots.append(torch.mul(g, c, out=s).sum(d))
            torch.sub(p, a, out=c)
            l1.append(torch.abs(c, out=s).sum(d))
        return dots, l1

    def multi_dots(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-row ``<a_i, b_i>`` of each multi-row tensor."""
        a, b = a[:self.nm], b[:self.nm]
        return [t.sum(d) for t, d in zip(torch._foreach_mul(a, b) if a else [], self.dims)]

    def multi_l1(self, a: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-row ``sum |a_i|`` of each multi-row tensor (CPU: through the scratch buffer)."""
        a = a[:self.nm]
        if self.cpu:
            return [torch.abs(x, out=s).sum(d) for x, s, d in zip(a, self.scratch, self.dims)]
        return [t.sum(d) for t, d in zip(torch._foreach_abs(a) if a else [], self.dims)]

    def row_sums(self, multi: list[torch.Tensor], singles: torch.Tensor | None) -> torch.Tensor:
        """Per-row sums, all rows in one vector: ``multi`` are the multi-row tensors' row sums
        (:meth:`multi_dots`, :meth:`multi_l1`), ``singles`` the single-row tensors' elementwise values
        concatenated (:meth:`cat_singles`), summed here per tensor."""
        parts = list(multi)
        if singles is not None:
            parts.append(torch.segment_reduce(singles, "sum", lengths=self.single_len, unsafe=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def per_tensor_sums(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(rows, "sum", lengths=self.rows_t, unsafe=True) if self.nm else rows

    def per_tensor_max(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(rows, "max", lengths=self.rows_t, unsafe=True) if self.nm else rows

    def expand_rows(self, per_tensor: torch.Tensor) -> torch.Tensor:
        return per_tensor.index_select(0, self.seg) if self.nm else per_tensor

    def split_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` split per tensor, shaped to broadcast against each tensor."""
        parts = list(rows.split(self.rows))
        for i, shape in enumerate(self.wshapes):
            parts[i] = parts[i].view(shape)
        if self.zero_d:
            parts[self.nm:] = [x.view(()) if z else x for x, z in zip(parts[self.nm:], self.zero)]
        return parts


class _RadiusBlock:
    """The radius state (``gamma``, ``gamma_exp_avg``, ``gamma_exp_avg_sq``) of a bucket of FTP tensors in one
    ``(3, T)`` tensor whose 0-D row elements *are* the tensors in ``optimizer.state[param]`` (views), so the
    radii's Adam runs as a few vector ops with nothing to gather or write back. Built from the state's current
    values; :meth:`owns` tells whether every state entry is still this block's view (a ``load_state_dict`` or a
    hand-edited state replaces them, and the block is then rebuilt). Also remembers the last ``n`` vector whose
    per-tensor slices are the states' ``prev_n``, to skip concatenating them again."""

    KEYS = ("gamma", "gamma_exp_avg", "gamma_exp_avg_sq")

    def __init__(self, sts: list[dict]):
        buf = torch.stack([st[k] for k in self.KEYS for st in sts]).view(3, len(sts))
        self.gamma, self.exp_avg, self.exp_avg_sq = buf.unbind(0)
        self.views = tuple(vec.unbind(0) for vec in (self.gamma, self.exp_avg, self.exp_avg_sq))
        for key, views in zip(self.KEYS, self.views):
            for st, view in zip(sts, views):
                st[key] = view
        self.n: torch.Tensor | None = None
        self.n_views: tuple[torch.Tensor, ...] = ()

    def owns(self, sts: list[dict]) -> bool:
        return all(st[key] is view for key, views in zip(self.KEYS, self.views) for st, view in zip(sts, views))

    def prev_n(self, sts: list[dict]) -> torch.Tensor:
        """The states' ``prev_n`` concatenated (the remembered vector when they are still its slices)."""
        if self.n is not None and all(st["prev_n"] is view for st, view in zip(sts, self.n_views)):
            return self.n
        return torch.cat([st["prev_n"] for st in sts])

    def keep_prev_n(self, n: torch.Tensor, views: tuple[torch.Tensor, ...]) -> None:
        self.n, self.n_views = n, views


class L2SP(RobustOptimizer):
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018, Sec. 3): the base optimizer plus the penalty returned by
    :meth:`regularizer`, ``alpha/2 sum ||W - W0||^2`` over constrained tensors and ``beta/2 sum ||W||^2`` over
    excluded ones (the new head), which the training loop adds to its loss.

    Keep it simple: the optimizer itself is plain AdamW/SGD (:class:`FineTune`'s update) -- the penalty's
    gradient goes through the base optimizer like the task loss's does (with AdamW it is therefore rescaled by
    Adam's second moments, unlike the paper's SGD). The base ``weight_decay`` is still applied to every tensor;
    L2-SP *replaces* weight decay in the paper, so pass ``weight_decay=0`` to reproduce it. Anchors (copies at
    construction) live in ``self.state[param]["anchor"]``; ``alpha`` and ``beta`` are per-group settings
    (``alpha`` is read on constrained groups, ``beta`` on excluded ones).
    """

    method = "l2sp"
    _constrains = True

    def __init__(self, params, *, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, alpha: float = 0.1, beta: float = 0.01,
                 exclude: Sequence[str] = ()):
        super().__init__(params, base=base, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, exclude=exclude,
                         extra=dict(alpha=alpha, beta=beta))

    def _validate_group(self, g: dict[str, Any]) -> None:
        super()._validate_group(g)
        for key in ("alpha", "beta"):
            if not (isinstance(g[key], (int, float)) and g[key] >= 0 and math.isfinite(g[key])):
                raise ConfigError(f"l2sp: {key} must be a finite number >= 0, got {g[key]!r}")

    def regularizer(self, model: nn.Module | None = None) -> torch.Tensor:
        """``Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2`` (L2-SP, Li et al. 2018, Sec. 3),
        differentiable in the parameters. Right after construction the ``alpha`` term is 0 (``W = W0``); the
        ``beta`` term is not unless ``beta = 0``. ``model`` is accepted for a uniform call; the tensors are the
        optimizer's own (the model's)."""
        total = super().regularizer(model)
        for g in self.param_groups:
            for p in g["params"]:
                if g["constrained"]:
                    if g["alpha"]:
                        total = total + g["alpha"] / 2 * (p - self._anchor(p, self.state[p])).pow(2).sum()
                elif g["beta"]:
                    total = total + g["beta"] / 2 * p.pow(2).sum()
        return total


class TPGM(RobustOptimizer):
    """Trainable Projected Gradient Method (Tian et al., CVPR 2023): FTP's bi-level
    predecessor. :meth:`step` is the plain base update; :meth:`project` fits one radius per constrained tensor
    on a held-out batch and projects the weights (``W0 + min(1, gamma/n) * (W - W0)`` per row, L1 row norms).

    Call ``opt.project(model, val_batch, loss_fn)`` every ``projection_interval`` training steps from the
    training loop, or give ``model``, ``val_batches`` (a zero-argument callable returning one ``(inputs,
    targets)`` batch), ``loss_fn`` and ``projection_interval`` here and :meth:`step` calls it itself (when the
    base step count of the first constrained tensor is a multiple of the interval).

    Cost: each projection step is one extra forward *and* backward pass through the whole model on the held-out
    batch (``projection_steps`` of them per call) -- the overhead FTP removes by reusing the training gradient.

    State, all in ``self.state[param]``: ``anchor`` (built with the optimizer); ``gamma`` and its Adam moments
    (``gamma_exp_avg``, ``gamma_exp_avg_sq``, ``gamma_step``), created by the first :meth:`project` with
    ``gamma`` = the current largest row norm (the first projection starts as a no-op and can only tighten).
    ``radius_lr`` is an absolute step in units of L1 row norm (Adam steps are about ``radius_lr`` long): choose
    it relative to the row norms ``sum |W - W0|`` of your layers, which grow with their fan-in.
    """

    method = "tpgm"
    _constrains = True

    def __init__(self, params, *, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, radius_lr: float = 1e-2,
                 projection_steps: int = 1, projection_interval: int | None = None,
                 model: nn.Module | None = None, val_batches: Callable[[], Any] | None = None,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, exclude: Sequence[str] = ()):
        super().__init__(params, base=base, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, exclude=exclude,
                         extra=dict(radius_lr=radius_lr))
        if not (isinstance(projection_steps, int) and projection_steps >= 1):
            raise ConfigError(f"tpgm: projection_steps must be an integer >= 1, got {projection_steps!r}")
        if projection_interval is not None and not (isinstance(projection_interval, int)
                                                    and projection_interval >= 1):
            raise ConfigError(f"tpgm: projection_interval must be an integer >= 1 or None, "
                              f"got {projection_interval!r}")
        auto = [model is not None, val_batches is not None, loss_fn is not None, projection_interval is not None]
        if any(auto[:3]) and not all(auto):
            raise ConfigError("tpgm: projecting inside step() needs all of model, val_batches (a callable "
                              "returning one held-out batch), loss_fn and projection_interval; pass none of "
                              "model/val_batches/loss_fn to call opt.project(...) from the training loop")
        self.projection_steps = projection_steps
        self.projection_interval = projection_interval
        self._auto = (model, val_batches, loss_fn) if all(auto) else None

    def _validate_group(self, g: dict[str, Any]) -> None:
        super()._validate_group(g)
        if not (isinstance(g["radius_lr"], (int, float)) and g["radius_lr"] >= 0):
            raise ConfigError(f"tpgm: radius_lr must be >= 0, got {g['radius_lr']!r}")

    def _after_step(self) -> None:
        if self._auto is None:
            return
        first = next((st for _, _, st in self._constrained()), None)
        if first is not None and first.get("step", 0) % self.projection_interval == 0:
            model, val_batches, loss_fn = self._auto
            self.project(model, val_batches(), loss_fn)

    def project(self, model: nn.Module, val_batch: Any, loss_fn: Callable[[Any, Any], torch.Tensor], *,
                steps: int | None = None, radius_lr: float | None = None) -> list[float]:
        """TPGM's projection update (Tian et al. CVPR 2023): fit the radii on ``val_batch``, then project.

        ``val_batch`` is ``(inputs, targets)``; the loss is ``loss_fn(model(inputs), targets)`` (``inputs`` is
        unpacked if it is a tuple), computed with ``torch.func.functional_call`` on the *projected* weights
        ``W0 + min(1, gamma/n) * (W - W0)``. ``steps`` (default ``projection_steps``) Adam steps of size
        ``radius_lr`` (default: the group's) update only the ``gamma`` of each constrained tensor (the derivative
        of ``min(1, gamma/n)`` is taken from below at ``gamma = n``, see ``_soft_scale``); each radius is
        clipped to ``[1e-8, max row norm]``; finally the projected weights are written into the model (rows
        inside their ball are left exactly as they were). The model's buffers are not modified (BatchNorm running
        statistics are updated on copies); its train/eval mode is used as is.

        Returns the held-out loss before each radius step (``steps`` floats; the first is the loss at the
        initial radii). Raises ``ConfigError`` if a constrained tensor is not a parameter of ``model``.
        """
        steps = self.projection_steps if steps is None else steps
        if not (isinstance(steps, int) and steps >= 1):
            raise ConfigError(f"tpgm.project: steps must be an integer >= 1, got {steps!r}")
        names = {p: n for n, p in model.named_parameters()}
        entries = []
        with torch.no_grad():
            for g, p, st in self._constrained():
                if p not in names:
                    raise ConfigError("tpgm.project: a tensor this optimizer constrains is not a parameter of the "
                                      "model given (pass the model whose parameters the optimizer was built from)")
                diff = p.detach() - st["anchor"]
                n = row_l1_norms(diff)
                if "gamma" not in st:
                    z = dict(device=p.device, dtype=p.dtype)
                    st["gamma"] = n.max().clone()
                    st["gamma_exp_avg"] = torch.zeros((), **z)
                    st["gamma_exp_avg_sq"] = torch.zeros((), **z)
                    st["gamma_step"] = 0
                _clip_radius(st["gamma"], n)
                lr = g["radius_lr"] if radius_lr is None else radius_lr
                entries.append((names[p], p, st, diff, n, lr))
        if not entries:
            return []
        inputs, targets = val_batch
        args = tuple(inputs) if isinstance(inputs, tuple) else (inputs,)
        fixed = {n: p.detach() for n, p in model.named_parameters()}
        losses = []
        for _ in range(steps):
            gammas = [st["gamma"].detach().clone().requires_grad_(True) for _, _, st, _, _, _ in entries]
            with torch.enable_grad():
                projected = {name: st["anchor"] + _soft_scale(gam, n).reshape(_row_shape(diff)) * diff
                             for (name, _, st, diff, n, _), gam in zip(entries, gammas)}
                buffers = {n: b.clone() for n, b in model.named_buffers()}
                out = functional_call(model, {**fixed, **projected, **buffers}, args)
                loss = loss_fn(out, targets)
                grads = torch.autograd.grad(loss, gammas, allow_unused=True)
            losses.append(float(loss.detach()))
            with torch.no_grad():
                for (_, _, st, _, n, lr), gr in zip(entries, grads):
                    gr = torch.zeros_like(st["gamma"]) if gr is None else gr
                    _adam_scalar(st, gr, lr=lr)
                    _clip_radius(st["gamma"], n)
        with torch.no_grad():
            for _, p, st, diff, n, _ in entries:
                _project_rows(p, st["anchor"], diff, (st["gamma"] / n).clamp(max=1.0))
        log.debug("tpgm.project: held-out loss %s over %d radius steps", losses, steps)
        return losses


# --------------------------------------------------------------------------------------------- factory

METHODS: dict[str, type[RobustOptimizer]] = {"finetune": FineTune, "l2sp": L2SP, "ftp": FTP, "tpgm": TPGM}


def _knobs_of(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters
            if n not in ("self", "params", "lr", "weight_decay", "exclude", "model")]


def _head_patterns(model: nn.Module) -> tuple[str, ...]:
    """Names of the classifier head: timm's ``get_classifier()`` parameters if any, else the patterns of
    ``DEFAULT_HEAD_PATTERNS`` that match a parameter name."""
    names = [n for n, _ in model.named_parameters()]
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # noqa: BLE001 -- a model's own get_classifier may not apply; fall back to names
            head = None
        if isinstance(head, nn.Module):
            ids = {id(p) for p in head.parameters()}
            found = tuple(n for n, p in model.named_parameters() if id(p) in ids)
            if found:
                return found
    return tuple(pat for pat in DEFAULT_HEAD_PATTERNS if any(fnmatch.fnmatchcase(n, pat) for n in names))


def make_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                   exclude: Sequence[str] | None = None, **knobs: Any) -> RobustOptimizer:
    """Build one of ``"finetune"``, ``"l2sp"``, ``"ftp"``, ``"tpgm"`` for ``model``'s trainable parameters.

    ``exclude`` lists fnmatch patterns of the *new* head's parameter names (left unconstrained by FTP/TPGM,
    ``beta``-penalised by L2-SP). ``None`` finds the head: timm's ``model.get_classifier()`` when it has
    parameters, else whichever of ``DEFAULT_HEAD_PATTERNS`` (``head.*``, ``fc.*``, ``classifier.*``) match; if
    none does, the constrained methods raise and ask for explicit patterns (``exclude=()`` constrains all).
    Every explicit pattern must match some parameter. Parameters with ``requires_grad=False`` are left out of
    the optimizer (and get no anchor).

    ``knobs`` are the method's keyword arguments (see :class:`FTP`, :class:`L2SP`, :class:`TPGM`,
    :class:`FineTune`), e.g. ``base="sgd", momentum=0.9, k=0.5, mu=1e-2, gamma_init=1e-8``. For TPGM, pass
    ``val_batches``, ``loss_fn`` and ``projection_interval`` to project inside ``step()`` (``model`` is filled in).
    Unknown names and unknown knobs raise ``ConfigError`` (a ``ValueError``) listing the valid ones.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    allowed = _knobs_of(cls)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options are {allowed} "
                          "(plus lr, weight_decay, exclude)")
    all_named = list(model.named_parameters())
    if exclude is None:
        exclude = _head_patterns(model)
        if not exclude and cls._constrains:
            raise ConfigError(f"{name}: could not find the classifier head among the parameter names "
                              f"({_few([n for n, _ in all_named])}); pass exclude=('yourhead.*',) or exclude=() "
                              "to constrain every parameter")
        log.info("%s: excluding the head %s from the constraint", name, list(exclude))
    elif isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    # validate the patterns against every name (a pattern may match only frozen tensors), then drop frozen ones
    groups = _split_named(all_named, exclude, method=name)
    for g in groups:
        g["params"] = [(n, p) for n, p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"{name}: the model has no parameter with requires_grad=True")
    if name == "tpgm" and any(k in knobs for k in ("val_batches", "loss_fn")):
        knobs = {**knobs, "model": model}
    return cls(groups, lr=lr, weight_decay=weight_decay, **knobs)
