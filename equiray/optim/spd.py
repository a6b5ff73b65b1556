"""SPD: Selective Projection Decay (Tian, Huang & Kira, "Rethinking Weight Decay for Robust Fine-Tuning of
Foundation Models", NeurIPS 2024), the FTP authors' successor: decay towards the pretrained weights, applied to
a tensor only in the steps where its own progress is inconsistent."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from equiray.errors import ConfigError
from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import register_optimizer

#: Per-parameter state SPD adds on top of the base optimizer's.
SPD_STATE_KEYS = ("anchor",)


@register_optimizer
class SPD(RobustOptimizer):
    """Selective Projection Decay (Tian et al. 2024, Algorithm 1), per tensor ("layer") ``W`` with anchor ``W0``:

    1. the base step (AdamW or SGD) proposes ``W~`` from ``W`` and the gradient ``g``;
    2. the step is *inconsistent* when ``c = -<g, W - W0> < 0``: the descent direction points back towards the
       pretrained weights, so the deviation accumulated so far no longer lowers the loss;
    3. then the part of the deviation this step added, ``r = max(0, ||W~ - W0|| - ||W - W0||) / ||W~ - W0||``
       (in [0, 1]), is pulled back: ``W <- W~ - strength * r * (W~ - W0)``; otherwise ``W <- W~``.

    ``strength`` is the paper's lambda. Tensors whose progress stays consistent move freely; the others cannot
    drift further from where they started, so no radius has to be learned (FTP) or fitted (TPGM). The base
    ``weight_decay`` is still applied to every tensor; SPD *replaces* weight decay in the paper, so pass
    ``weight_decay=0`` to reproduce it. Excluded tensors (the new head) get the base step alone. Everything runs
    on the tensors' device with no host synchronisation (the condition is a mask, not a branch).
    """

    method = "spd"
    _constrains = True

    def __init__(self, params, *, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, strength: float = 1.0,
                 exclude: Sequence[str] = ()):
        super().__init__(params, base=base, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         momentum=momentum, dampening=dampening, nesterov=nesterov, exclude=exclude,
                         extra=dict(strength=strength))
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _validate_group(self, g: dict[str, Any]) -> None:
        super()._validate_group(g)
        s = g["strength"]
        if not (isinstance(s, (int, float)) and s >= 0 and math.isfinite(s)):
            raise ConfigError(f"spd: strength must be a finite number >= 0, got {s!r}")

    def _before_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                            states: list[dict]) -> None:
        """Per tensor, at the old weights: whether the step is inconsistent, and the deviation's norm."""
        self._before = []
        if not group["constrained"] or not group["strength"]:
            return
        for p, g, st in zip(params, grads, states):
            dev = p - self._anchor(p, st)
            self._before.append(((g * dev).sum() > 0, dev.norm()))  # -<g, W - W0> < 0

    def _after_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                           states: list[dict]) -> None:
        if not self._before:
            return
        for p, st, (inconsistent, prev) in zip(params, states, self._before):
            dev = p - self._anchor(p, st)
            now = dev.norm()
            ratio = ((now - prev) / now.clamp_min(torch.finfo(now.dtype).tiny)).clamp(0.0, 1.0)
            p.sub_(dev * (group["strength"] * ratio * inconsistent))
        self._before = []
