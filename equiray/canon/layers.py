"""Group convolutions on the pixel grid: the lifting conv Z^2 -> G and the group conv G -> G, with filters
sampled from a steerable basis (one copy per group element) so that every element's filters are sampled alike.

The layers compute the regular representation: rotating the input by ``g`` rotates the maps by ``g`` and moves
channel ``h`` to ``g h``. Exact for groups acting on the pixel grid (C4, D4 and their subgroups), approximate for
other orders (interpolated rotations).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.errors import EquirayError
from equiray.groups import Group

__all__ = ["GroupLiftConv", "GroupConv", "version_key"]


def _steerable_basis(kernel_size: int, group: Group, *, sigma: float = 0.6, max_frequency: int = 3) -> torch.Tensor:
    """Filter basis sampled from continuous functions, one copy per group element: (|G|, J, k, k).

    Basis function (ring r, frequency m): ``exp(-(rho - r)^2 / 2 sigma^2) * {cos, sin}(m phi)`` on the inscribed
    disk, with ``m`` up to ``min(r, max_frequency)`` (higher frequencies alias on a pixel ring). Element ``h`` (reflect, then rotate by theta) gets the
    functions evaluated at ``h^-1 p = F^s R(-theta) p``, so every element's filters are sampled alike: rotating a pixel
    filter by 45 degrees instead would blur the odd elements' filters and bias their scores. On the pixel grid
    (multiples of 90 degrees) this equals ``group.act`` on the filters exactly.
    """
    c = (kernel_size - 1) / 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - c
    u = coords[None, :].expand(kernel_size, kernel_size)  # right
    v = -coords[:, None].expand(kernel_size, kernel_size)  # up (rows grow downward)
    out = []
    for h in range(group.order):
        theta = float(group.angles(h))
        ru = math.cos(theta) * u + math.sin(theta) * v  # h^-1 p = F^s R(-theta) p
        rv = -math.sin(theta) * u + math.cos(theta) * v
        if bool(group.reflection(h)):
            ru = -ru
        rho = torch.sqrt(ru ** 2 + rv ** 2)
        phi = torch.where(rho > 1e-9, torch.atan2(rv, ru), torch.zeros_like(rho))
        centre = (rho > 1e-9).double()  # angular functions vanish at the centre, where phi is undefined
        funcs = []
        for r in range(int(c) + 1):
            radial = torch.exp(-((rho - r) ** 2) / (2 * sigma ** 2)) * (rho <= c + 0.5)
            funcs.append(radial)
            for m in range(1, min(r, max_frequency) + 1):
                funcs += [radial * centre * torch.cos(m * phi), radial * centre * torch.sin(m * phi)]
        out.append(torch.stack(funcs))
    basis = torch.stack(out)  # (|G|, J, k, k)
    exact = group.is_exact()
    # grid-exact elements: the exact pixel permutation of element 0's basis (no cos(pi/2) rounding)
    basis[exact] = group.act(basis[0].expand(int(exact.sum()), -1, -1, -1), torch.arange(group.order)[exact])
    return (basis / basis[0].flatten(1).norm(dim=1)[None, :, None, None]).float()


def version_key(t: torch.Tensor) -> tuple[int, int]:
    """What identifies ``t``'s current values for a cache: its in-place version counter and storage. Tensors made
    under ``torch.inference_mode`` (a model built or loaded there) have no counter; for them the storage alone
    (an in-place change to one, inside inference mode, goes unseen)."""
    return (-1 if t.is_inference() else t._version), t.data_ptr()


class _ExpandedWeightCache:
    """Inference reuses the expanded (|G|-fold) filter bank until the weights change (training rebuilds it every
    step, since the expansion is part of the graph)."""

    def cached(self, build):
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return build()
        key = (*version_key(self.weight), self.weight.device, self.weight.dtype)
        if getattr(self, "_cache_key", None) != key:
            self._cache_key, self._cache = key, build().detach()
        return self._cache


class GroupLiftConv(_ExpandedWeightCache, nn.Module):
    """Lifting convolution Z^2 -> G: output channel (o, h) correlates the input with ``h . W_o``.

    Output (B, O, |G|, H, W); rotating the input by ``g`` rotates the maps by ``g`` and moves channel ``h`` to
    ``g h`` (the regular representation).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, group: Group):
        super().__init__()
        if kernel_size % 2 == 0:
            raise EquirayError(f"group convolutions need an odd kernel size (centred filters), got {kernel_size}")
        self.group, self.kernel_size = group, kernel_size
        self.register_buffer("basis", _steerable_basis(kernel_size, group), persistent=False)  # (|G|, J, k, k)
        j = self.basis.shape[1]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, j) * math.sqrt(2.0 / (in_channels * j)))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def expanded_weight(self) -> torch.Tensor:
        o, i, _ = self.weight.shape
        k = self.kernel_size
        w = torch.einsum("oij,hjxy->ohixy", self.weight, self.basis)  # (O, |G|, I, k, k): filter h . W_o
        return w.reshape(o * self.group.order, i, k, k)  # (O*|G|, I, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.group.order
        y = F.conv2d(x, self.cached(self.expanded_weight), self.bias.repeat_interleave(n), padding=self.kernel_size // 2)
        return y.view(x.shape[0], -1, n, *y.shape[-2:])  # (B, O, |G|, H, W)


class GroupConv(_ExpandedWeightCache, nn.Module):
    """Group convolution G -> G: ``out(h) = sum_u conv(in(u), h . W[h^-1 u])``; equivariant in the same sense."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, group: Group):
        super().__init__()
        if kernel_size % 2 == 0:
            raise EquirayError(f"group convolutions need an odd kernel size (centred filters), got {kernel_size}")
        self.group, self.kernel_size = group, kernel_size
        n = group.order
        self.register_buffer("basis", _steerable_basis(kernel_size, group), persistent=False)  # (|G|, J, k, k)
        j = self.basis.shape[1]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, n, j) * math.sqrt(2.0 / (in_channels * n * j)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        h = torch.arange(n)
        self.register_buffer("_index", group.compose(group.inverse(h)[:, None], h[None, :]), persistent=False)

    def expanded_weight(self) -> torch.Tensor:
        o, i, n, _ = self.weight.shape
        k = self.kernel_size
        w = self.weight[:, :, self._index]  # (O, I, |G|h, |G|u, J): W[h^-1 u]
        w = torch.einsum("oihuj,hjxy->ohiuxy", w, self.basis)  # (O, |G|h, I, |G|u, k, k): h . W[h^-1 u]
        return w.reshape(o * n, i * n, k, k)  # (O*|G|, I*|G|, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n, hh, ww = x.shape
        if n != self.group.order or c != self.weight.shape[1]:
            raise ValueError(f"expected (B, {self.weight.shape[1]}, {self.group.order}, H, W), got {tuple(x.shape)}")
        y = F.conv2d(x.reshape(b, c * n, hh, ww), self.cached(self.expanded_weight), self.bias.repeat_interleave(n),
                     padding=self.kernel_size // 2)
        return y.view(b, -1, n, hh, ww)  # (B, O, |G|, H, W)
