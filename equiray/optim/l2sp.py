"""L2-SP (Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks",
ICML 2018): a penalty ``alpha/2 ||W - W0||^2`` on pretrained weights plus ``beta/2 ||W_head||^2`` on the new
head, added to the loss through :meth:`L2SP.regularizer`."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from equiray.errors import ConfigError
from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import register_optimizer

#: Per-parameter state L2-SP adds on top of the base optimizer's.
L2SP_STATE_KEYS = ("anchor",)


@register_optimizer
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
