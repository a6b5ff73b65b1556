"""equiray's own small models: the augmentation-ensemble member (Nordenfors & Flinth 2024) and a ResNet sized
for 28x28 inputs (the default pretrained backbone)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.errors import EquirayError
from equiray.models._registry import register_model

Support = Literal["full", "symmetric", "asymmetric", "cross_corner"]

# 3x3 filter supports. "symmetric" (plus shape) and "full" are closed under rot90 and flips, so the set of
# layers the net can express is closed under C4/D4 (condition (a) of the paper's theorem); the other two are not.
# "asymmetric" is equiray's (six taps; its symmetric core is the centre tap alone); "cross_corner" is the paper's
# (the four arms of the plus and the top-left corner, no centre: five taps, as many as "symmetric"; its symmetric
# core, where an invariant initialisation keeps its weights, is the 4-tap cross).
SUPPORTS: dict[str, torch.Tensor] = {
    "full": torch.ones(3, 3),
    "symmetric": torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
    "asymmetric": torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    "cross_corner": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
}


class _SigmoidTanh(torch.autograd.Function):
    """tanh computed as ``2 sigmoid(2x) - 1`` (the same function; within 2e-7 of ``torch.tanh`` in float32),
    with tanh's own one-op backward ``g (1 - y^2)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x * 2).mul_(2).sub_(1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def fast_tanh(x: torch.Tensor) -> torch.Tensor:
    """``tanh`` for the members' feature maps. On CPU, PyTorch's float32 tanh kernel is 3-4x slower than its
    sigmoid (4.3 vs 1.0 ms for 1.6M values on 2 cores), and tanh was 18% of an ensemble training step; via the
    sigmoid it costs a quarter of that. Elsewhere (float64, other devices) it is ``torch.tanh``."""
    if x.dtype == torch.float32 and x.device.type == "cpu":
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanh.apply(x)
        if torch.is_grad_enabled():  # e.g. under vmap, where a tensor's requires_grad does not show: out of place
            return torch.sigmoid(x * 2) * 2 - 1
        return torch.sigmoid(x * 2).mul_(2).sub_(1)  # no backward: plain ops (which TorchScript can trace)
    return torch.tanh(x)


class Tanh(nn.Module):
    """``nn.Tanh`` through :func:`fast_tanh`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_tanh(x)


class MaskedConv2d(nn.Conv2d):
    """A conv whose kernel is zero outside a fixed support mask (the mask is a buffer, not a parameter)."""

    def __init__(self, in_channels: int, out_channels: int, support: Support = "full", **kwargs):
        if support not in SUPPORTS:
            raise EquirayError(f"unknown filter support {support!r}: choose one of {sorted(SUPPORTS)}")
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False, **kwargs)
        self.support = support
        self.register_buffer("mask", SUPPORTS[support].clone(), persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, None, self.stride, self.padding)


class SmallCNN(nn.Module):
    """equiray's compact ensemble member: three bias-free 3x3 conv layers with ``width`` channels at full
    resolution, each followed by GroupNorm(1, C) (a normalisation over all channels and positions, with a
    per-channel affine, so it commutes with rotations) and tanh; then a global average pool and a linear head with
    a bias (2,906 parameters at width 16 on the symmetric support, any input size). No BatchNorm running
    statistics, so members train under ``torch.func.vmap``. The paper's own network is :class:`PaperCNN`.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16, depth: int = 3,
                 support: Support = "full"):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for _ in range(depth):
            layers += [MaskedConv2d(c, width, support), nn.GroupNorm(1, width), Tanh()]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's convention, which robust fine-tuning uses to find the new head)."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))  # (B, C, H, W) -> (B, C) -> (B, classes)


class PaperCNN(nn.Module):
    """The network of Nordenfors & Flinth's experiment (their reference code's ``omegaCNN``): three bias-free 3x3
    convs of ``width`` channels on a filter support, the first two each followed by a 2x2 average pool, each by
    tanh and a LayerNorm over the feature map's positions without affine (per sample and channel); the last map
    flattened into a linear layer without bias. Every weight starts N(0, 1) (zero outside the support). At 28x28
    and width 16: 10,480 weights on a 5-tap support (2,640 in the convs, 7,840 in the head). The head reads
    positions, not a pooled vector, so the net is not invariant by construction; the set of heads is closed under
    the group (a full linear map), as the theorem needs.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16, support: Support = "symmetric",
                 input_size: int = 28):
        super().__init__()
        if input_size % 4:
            raise EquirayError(f"nf_cnn: input_size must be a multiple of 4 (two 2x2 pools), not {input_size}")
        self.convs = nn.ModuleList([MaskedConv2d(in_chans, width, support), MaskedConv2d(width, width, support),
                                    MaskedConv2d(width, width, support)])
        self.head = nn.Linear(width * (input_size // 4) ** 2, num_classes, bias=False)
        with torch.no_grad():
            for conv in self.convs:
                nn.init.normal_(conv.weight).mul_(conv.mask)
            nn.init.normal_(self.head.weight)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 2:
                x = F.avg_pool2d(x, 2)
            x = fast_tanh(x)
            x = F.layer_norm(x, x.shape[-2:])
        return self.head(x.flatten(-3))


def effective_parameters(model: nn.Module) -> int:
    """Trainable weights, counting a masked conv's kernel only on its support (the paper's count)."""
    total = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, MaskedConv2d):
            total += int(module.mask.count_nonzero()) * module.in_channels * module.out_channels
            own = [p for p in own if p is not module.weight]
        total += sum(p.numel() for p in own)
    return total


def _no_hub_weights(name: str, pretrained: bool) -> None:
    if pretrained:
        raise EquirayError(f"{name} has no hub weights; its pretrained weights come from an equiray pipeline "
                           "(e.g. `equiray pretrain`, then models:/equiray-backbone@pretrained)")


@register_model
def small_cnn(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False, width: int = 16,
              depth: int = 3, support: Support = "full") -> nn.Module:
    """equiray's compact augmentation-ensemble member (:class:`SmallCNN`: 3 x 16-channel 3x3 convs with
    GroupNorm and tanh, global average pool, linear head); the paper's network is ``nf_cnn``."""
    _no_hub_weights("small_cnn", pretrained)
    return SmallCNN(in_chans, num_classes, width=width, depth=depth, support=support)


@register_model
def nf_cnn(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False, width: int = 16,
           support: Support = "symmetric", input_size: int = 28) -> nn.Module:
    """Nordenfors & Flinth's experiment network (:class:`PaperCNN`; 10,480 weights at 28x28 on a 5-tap support)."""
    _no_hub_weights("nf_cnn", pretrained)
    return PaperCNN(in_chans, num_classes, width=width, support=support, input_size=input_size)


@register_model
def resnet8(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
            channels: tuple[int, ...] = (32, 64, 128, 256), stem_width: int = 32, **kwargs) -> nn.Module:
    """A timm ResNet with one BasicBlock per stage and narrow stages: 1.2M parameters, ~0.3 s per 1k 28x28
    images on 2 CPU cores for a training step. Same class as timm's resnet18, so timm tooling applies."""
    from timm.models.resnet import BasicBlock, ResNet

    _no_hub_weights("resnet8", pretrained)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans,
                  channels=tuple(channels), stem_width=stem_width, **kwargs)
