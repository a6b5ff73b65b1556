"""TPGM -- Trainable Projected Gradient Method (Tian et al., "Trainable Projected Gradient Method for Robust
Fine-tuning", CVPR 2023), FTP's bi-level predecessor: the same per-row projection as FTP, but the radii are
fitted by gradient descent on a held-out batch, which costs extra forward/backward passes every time
:meth:`TPGM.project` runs."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call

from equiray.errors import ConfigError
from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import register_optimizer
from equiray.optim.kernels import _adam_scalar, _clip_radius, _project_rows, _row_shape, _soft_scale, row_l1_norms

log = logging.getLogger(__name__)

#: Per-parameter state TPGM adds on top of the base optimizer's.
TPGM_STATE_KEYS = ("anchor", "gamma", "gamma_exp_avg", "gamma_exp_avg_sq", "gamma_step")


@register_optimizer
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
    loop_options = ("projection_steps", "projection_interval", "model", "val_batches", "loss_fn")

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
