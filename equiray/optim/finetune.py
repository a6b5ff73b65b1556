"""Plain fine-tuning: the base optimizer (AdamW or SGD) alone, the reference every robust method is
compared to."""
from __future__ import annotations

from typing import Sequence

from equiray.optim.base import RobustOptimizer
from equiray.optim.factory import register_optimizer


@register_optimizer
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
