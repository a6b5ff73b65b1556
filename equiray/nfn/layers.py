"""The Monomial-NFN layers, features -> features (equivariant: E1-E6 of the package docstring) and
features -> vectors (the invariant pool)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.nfn.spec import SCALING_GROUPS, LayerSpec, NetworkSpec, ScalingGroup, WeightSpaceFeatures


def _fold(weight: torch.Tensor) -> torch.Tensor:
    """Kernel axes are fixed by the symmetry: fold them into channels, (B, C, n, m, *k) -> (B, C*K, n, m)."""
    if weight.dim() == 4:
        return weight
    b, _, n, m = weight.shape[:4]
    return weight.movedim((2, 3), (-2, -1)).reshape(b, -1, n, m)  # (B, C, *k, n, m) -> (B, C*K, n, m)


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class FirstLayerMap(nn.Module):
    """(E1, E2): layer 1, whose input axis k is fixed and whose rows j are permuted and scaled by d_1[j]."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, cb, n = in_channels * layer.spatial_size, in_channels, layer.in_features
        self.w_self = _uniform(out_channels, cw, fan_in=2 * cw + cb)
        self.w_mix = _uniform(out_channels, cw, fan_in=2 * cw + cb)
        self.mix = _uniform(n, n, fan_in=n)
        self.w_from_b = _uniform(out_channels, cb, fan_in=2 * cw + cb)
        self.pos_from_b = nn.Parameter(torch.ones(n))
        self.b_self = _uniform(out_channels, cb, fan_in=cw + cb)
        self.b_from_w = _uniform(out_channels, cw, fan_in=cw + cb)
        self.pos_to_b = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = _fold(weight)  # (B, C*K, n_1, n_0)
        w_out = (torch.einsum("oc,bcjk->bojk", self.w_self, w)
                 + torch.einsum("oc,kl,bcjl->bojk", self.w_mix, self.mix, w)
                 + torch.einsum("oc,k,bcj->bojk", self.w_from_b, self.pos_from_b, bias))  # (B, O, n_1, n_0)
        b_out = (torch.einsum("oc,bcj->boj", self.b_self, bias)
                 + torch.einsum("oc,k,bcjk->boj", self.b_from_w, self.pos_to_b, w))  # (B, O, n_1)
        return w_out, b_out


class HiddenLayerMap(nn.Module):
    """(E3): a hidden layer, both axes permuted and scaled: only entrywise channel mixing survives, no bias."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw = in_channels * layer.spatial_size
        self.w_self = _uniform(out_channels, cw, fan_in=cw)
        self.b_self = _uniform(out_channels, in_channels, fan_in=in_channels)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_out = torch.einsum("oc,bcjk->bojk", self.w_self, _fold(weight))  # (B, O, n_i, n_{i-1})
        return w_out, torch.einsum("oc,bcj->boj", self.b_self, bias)  # (B, O, n_i)


class LastLayerMap(nn.Module):
    """(E4, E5): layer L, whose output axis j is fixed; its bias is invariant and gets the only free bias ``t``."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, cb, n = in_channels * layer.spatial_size, in_channels, layer.out_features
        self.w_self = _uniform(out_channels, cw, fan_in=2 * cw)
        self.w_mix = _uniform(out_channels, cw, fan_in=2 * cw)
        self.mix = _uniform(n, n, fan_in=n)
        self.b_self = _uniform(out_channels, cb, fan_in=2 * cb)
        self.b_mix = _uniform(out_channels, cb, fan_in=2 * cb)
        self.bias_mix = _uniform(n, n, fan_in=n)
        self.free_bias = nn.Parameter(torch.zeros(out_channels, n))

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = _fold(weight)  # (B, C*K, n_L, n_{L-1})
        w_out = (torch.einsum("oc,bcjk->bojk", self.w_self, w)
                 + torch.einsum("oc,ji,bcik->bojk", self.w_mix, self.mix, w))  # (B, O, n_L, n_{L-1})
        b_out = (torch.einsum("oc,bcj->boj", self.b_self, bias)
                 + torch.einsum("oc,ji,bci->boj", self.b_mix, self.bias_mix, bias) + self.free_bias)  # (B, O, n_L)
        return w_out, b_out


class SignCoupling(nn.Module):
    """(E6): under sign flips ``W_L[:, k]`` and ``b_{L-1}[k]`` both change by ``d_{L-1}[k]``, so they may mix."""

    def __init__(self, last: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, n = in_channels * last.spatial_size, last.out_features
        self.q = _uniform(out_channels, in_channels, fan_in=in_channels)
        self.q_pos = nn.Parameter(torch.ones(n))
        self.r = _uniform(out_channels, cw, fan_in=cw)
        self.r_pos = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, last_weight: torch.Tensor, prev_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the additions to (W'_L, b'_{L-1})."""
        dw = torch.einsum("oc,j,bck->bojk", self.q, self.q_pos, prev_bias)  # (B, O, n_L, n_{L-1})
        db = torch.einsum("oc,j,bcjk->bok", self.r, self.r_pos, _fold(last_weight))  # (B, O, n_{L-1})
        return dw, db


class MonomialLinear(nn.Module):
    """The equivariant linear layer (E1-E5, plus E6 for ``group="sign"``), features -> features.

    Input features may have kernel axes (``spec``); the output has none (they are folded into channels), so its
    spec is ``spec.without_spatial()`` (:attr:`out_spec`).
    """

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int, *, group: ScalingGroup = "positive"):
        super().__init__()
        if spec.num_layers < 2:
            raise EquirayError("Monomial-NFN layers need networks with at least 2 layers (1 hidden layer); a "
                               "single layer has no hidden-unit symmetry")
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        self.spec, self.group, self.in_channels = spec, group, in_channels
        last = spec.num_layers - 1
        self.maps = nn.ModuleList(
            (FirstLayerMap if i == 0 else LastLayerMap if i == last else HiddenLayerMap)(layer, in_channels,
                                                                                          out_channels)
            for i, layer in enumerate(spec.layers))
        self.coupling = SignCoupling(spec.layers[-1], in_channels, out_channels) if group == "sign" else None

    @property
    def out_spec(self) -> NetworkSpec:
        return self.spec.without_spatial()

    def forward(self, features: WeightSpaceFeatures) -> WeightSpaceFeatures:
        self.spec.check(features, channels=self.in_channels)
        out = [m(w, b) for m, (w, b) in zip(self.maps, features)]
        weights, biases = [w for w, _ in out], [b for _, b in out]
        if self.coupling is not None:
            dw, db = self.coupling(features.weights[-1], features.biases[-2])
            weights[-1], biases[-2] = weights[-1] + dw, biases[-2] + db
        return WeightSpaceFeatures(tuple(weights), tuple(biases))


class FeatureActivation(nn.Module):
    """An entrywise nonlinearity on every tensor: ReLU for positive scalings, an odd function for sign flips."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, features: WeightSpaceFeatures) -> WeightSpaceFeatures:
        return features.map(self.fn)


# ----------------------------------------------------------------------------------------- invariant layer
class MonomialInvariantPool(nn.Module):
    """Entry-wise scale removal, then the mean over permuted axes: features -> (B, out_dim).

    ``"positive"``: ``gamma * v / ||v|| + beta`` per entry's channel vector ``v`` (degree-0 homogeneous, so
    invariant to ``v -> d v``, d > 0); ``"sign"``: ``|P v| + beta`` (even, so invariant to ``v -> -v``). Kept axes:
    the input axis of W_1, the output axis of W_L and b_L.
    """

    def __init__(self, spec: NetworkSpec, channels: int, *, group: ScalingGroup = "positive"):
        super().__init__()
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        if any(layer.kernel_size for layer in spec.layers):
            raise EquirayError("pool features without kernel axes (the output of a MonomialLinear layer)")
        self.spec, self.group, self.channels = spec, group, channels
        n = 2 * spec.num_layers
        if group == "positive":
            self.gamma = nn.Parameter(torch.ones(n, channels))
        else:
            self.proj = nn.Parameter(torch.eye(channels).repeat(n, 1, 1) + 0.1 * torch.randn(n, channels, channels))
        self.beta = nn.Parameter(torch.zeros(n, channels))

    @property
    def out_dim(self) -> int:
        n_in, n_out, num = self.spec.layers[0].in_features, self.spec.layers[-1].out_features, self.spec.num_layers
        # W_1 keeps n_0, hidden W_i (L-2) and b_1..b_{L-1} pool to C each, W_L and b_L keep n_L
        return self.channels * (n_in + (num - 2) + (num - 1) + 2 * n_out)

    def _entrywise(self, x: torch.Tensor, t: int) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.group == "positive":
            tiny = torch.finfo(x.dtype).tiny ** 0.5  # a norm below this counts as zero (exact invariance above it)
            u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(tiny)
            return self.gamma[t].view(view) * u + self.beta[t].view(view)
        return torch.einsum("oc,bc...->bo...", self.proj[t], x).abs() + self.beta[t].view(view)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        self.spec.check(features, channels=self.channels)
        last, pooled = len(features) - 1, []
        for i, (w, b) in enumerate(features):
            w, b = self._entrywise(w, 2 * i), self._entrywise(b, 2 * i + 1)
            dims = tuple(a + 2 for a in self.spec.permuted_axes(i))
            pooled.append(w.mean(dim=dims).flatten(1))  # (B, C[, n_0 | n_L])
            pooled.append((b if i == last else b.mean(dim=2)).flatten(1))  # (B, C[, n_L])
        return torch.cat(pooled, dim=1)  # (B, out_dim)
