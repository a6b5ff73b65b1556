"""BatchNorm folded into a per-channel affine map, so a pretrained network can be stacked into an ensemble.

A BatchNorm layer keeps running statistics that training updates in place, which ``torch.func`` cannot stack
across members (and which a member's own batches would pull apart from the statistics the network was pretrained
with). :func:`freeze_batchnorm` replaces each ``BatchNorm2d`` by an :class:`AffineNorm2d` that computes exactly
what the layer computed in eval mode, ``scale * x + shift`` per channel, with ``scale`` and ``shift`` trainable
(the statistics folded in, as detectron2's frozen BatchNorm does, but learnable): fine-tuning then moves the
affine map and never the statistics.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AffineNorm2d", "freeze_batchnorm"]


class AffineNorm2d(nn.Module):
    """``scale[c] * x[:, c] + shift[c]``: a BatchNorm2d in eval mode with its statistics folded in."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.scale = nn.Parameter(torch.ones(num_features))
        self.shift = nn.Parameter(torch.zeros(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "AffineNorm2d":
        """The affine map ``bn`` computes in eval mode (running statistics; weight 1 and bias 0 without affine)."""
        out = cls(bn.num_features).to(device=bn.running_mean.device if bn.running_mean is not None else None)
        with torch.no_grad():
            if bn.running_var is None:  # track_running_stats=False: the statistics are the batch's own
                raise ValueError("a BatchNorm without running statistics normalises by each batch: nothing to fold")
            inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
            weight = bn.weight.float() if bn.affine else torch.ones_like(inv_std)
            bias = bn.bias.float() if bn.affine else torch.zeros_like(inv_std)
            out.scale.copy_(weight * inv_std)
            out.shift.copy_(bias - bn.running_mean.float() * weight * inv_std)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None] + self.shift[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.num_features}"


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``model`` (in place) by the :class:`AffineNorm2d` it computes in eval mode;
    returns ``model``. The model's outputs in eval mode do not change; in train mode they no longer depend on the
    batch."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            setattr(model, name, AffineNorm2d.from_batchnorm(child))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):  # e.g. timm's BatchNormAct2d: an activation too
            raise ValueError(f"cannot fold {name} ({type(child).__name__}): only plain BatchNorm2d layers are folded")
        else:
            freeze_batchnorm(child)
    return model
