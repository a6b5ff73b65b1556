"""A mixture of different models: their class probabilities averaged with weights, as one model.

Members need not share an architecture (a canonicalized model and a plain fine-tuned backbone, say): what they
share is the input and the classes. The mixture pays every member's forward pass; what it buys is that members
that fail on different inputs cover for each other (an ensemble of strong, different members)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from equiray.errors import ConfigError
from equiray.models._registry import create_model, register_model

__all__ = ["Mixture", "mixture"]


class Mixture(nn.Module):
    """``members``' softmax probabilities averaged with ``weights`` (normalised to sum to 1; equal by default).
    Returns the log of that mean, so a softmax of the output gives the mixed probabilities back."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None):
        super().__init__()
        if not members:
            raise ConfigError("a mixture needs at least one member")
        weights = [1.0] * len(members) if weights is None else [float(w) for w in weights]
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"mixture weights: one non-negative weight per member ({len(members)}), not all 0; "
                              f"got {weights}")
        self.members = nn.ModuleList(members)
        self.weights = tuple(w / sum(weights) for w in weights)

    def member_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's log-probabilities, ``(members, B, K)`` (half-precision logits in float32)."""
        out = [m(x) for m in self.members]
        return torch.stack([o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in out]).log_softmax(-1)

    def mix(self, member_log_probs: torch.Tensor) -> torch.Tensor:
        """The log of the weighted mean of ``(members, B, K)`` log-probabilities: ``(B, K)``."""
        log_w = torch.tensor(self.weights, dtype=member_log_probs.dtype, device=member_log_probs.device).log()
        return torch.logsumexp(member_log_probs + log_w[:, None, None], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.member_log_probs(x))


@register_model
def mixture(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
            members: Sequence[Mapping[str, Any]] = ({"name": "resnet8"},),
            weights: Sequence[float] | None = None) -> nn.Module:
    """Models averaged in probability; ``members``: each a model spec's ``{"name": ..., "kwargs": {...}}`` (what
    ``equiray.create_model`` takes), ``weights``: one per member (equal when left out). One member by default: the
    mixture of one model is that model."""
    nets = [create_model(m["name"], in_chans=in_chans, num_classes=num_classes, pretrained=pretrained,
                         **dict(m.get("kwargs", {}))) for m in members]
    return Mixture(nets, weights)
