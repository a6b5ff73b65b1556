"""Test-time averaging over a group's orbit: the simplest invariant model built from any backbone, and the peer
every learned symmetry method is measured against (``|G|`` forward passes per input)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from equiray.groups import get_group
from equiray.models._registry import create_model, register_model

__all__ = ["OrbitAveraged", "orbit_averaged"]


class OrbitAveraged(nn.Module):
    """``backbone`` on every transformed copy ``g.x`` of the input, its class probabilities averaged over the
    group. Returns the log of that mean (a softmax of it gives the mean back), so it is invariant to the group by
    construction; ``padding`` fills the corners a rotation by other than 90 degrees brings in."""

    def __init__(self, backbone: nn.Module, group: str = "C8", *, padding: str = "zeros"):
        super().__init__()
        self.backbone, self.group, self.padding = backbone, get_group(group), padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.group.order
        copies = self.group.orbit(x, padding=self.padding).flatten(0, 1)  # (B*|G|, C, H, W)
        logp = self.backbone(copies).float().log_softmax(-1).view(b, n, -1)
        return torch.logsumexp(logp, dim=1) - math.log(n)


@register_model
def orbit_averaged(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
                   backbone: str = "resnet8", backbone_kwargs: dict | None = None, group: str = "C8",
                   padding: str = "zeros") -> nn.Module:
    """A backbone (equiray or timm name) averaged over ``group``'s orbit at test time, as one model."""
    net = create_model(backbone, in_chans=in_chans, num_classes=num_classes, pretrained=pretrained,
                       **dict(backbone_kwargs or {}))
    return OrbitAveraged(net, group, padding=padding)
