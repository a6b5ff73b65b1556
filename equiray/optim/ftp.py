"""FTP -- Fast Trainable Projection (Tian, Liu, Smith & Kira, "Fast Trainable Projection for Robust Fine-Tuning",
NeurIPS 2023, Algorithm 1 / Fig. 1a). Every step: an unconstrained base-optimizer update (UGD), a radius update
that reuses the gradient already computed for that step (ProjUpdate), and a projection of each weight row back
into an L1 ball of learned radius around the pretrained weights (Projection). No extra forward or backward pass.

*Speed.* ``step()`` works on a whole parameter group at a time, with no host synchronisation: FTP's extra work
is four passes over each constrained tensor plus a few dozen small vector ops for all radii of a group
(:class:`_RowLayout`). Per-tensor state stays per tensor: ``gamma`` / ``gamma_exp_avg`` / ``gamma_exp_avg_sq``
are 0-D tensors in ``optimizer.state[param]`` that are views of one shared ``(3, T)`` tensor per group
(:class:`_RadiusBlock`, rebuilt transparently after ``load_state_dict`` or a hand-made change), and ``prev_n``
slices of one vector of row norms.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from equiray.errors import ConfigError
from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import register_optimizer
from equiray.optim.kernels import GAMMA_MIN, NORM_EPS, RADIUS_BETAS, RADIUS_EPS

#: Per-parameter state FTP adds on top of the base optimizer's
#: (``step``, ``exp_avg``, ``exp_avg_sq`` for AdamW; ``step``, ``momentum_buffer`` for SGD).
FTP_STATE_KEYS = ("anchor", "gamma", "gamma_exp_avg", "gamma_exp_avg_sq", "gamma_step", "prev_c", "prev_n")

_SCRATCH_DEVICES = ("cpu",)           # tensor-by-tensor passes through a scratch buffer (else foreach ops)


@register_optimizer
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
