"""The hidden-unit monomial group (S1, S2) acting on weight-space features: draw elements, apply them, invert."""
from __future__ import annotations

import dataclasses
import math

import torch

from equiray.errors import EquirayError
from equiray.nfn.spec import SYMMETRIES, NetworkSpec, Symmetry, WeightSpaceFeatures


def _permute_scale(x: torch.Tensor, dim: int, perm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y[..., j, ...] = scale[j] * x[..., perm[j], ...]`` along ``dim``, per network (perm, scale: (B, n))."""
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = perm.shape[1]
    y = x.gather(dim, perm.to(x.device).view(shape).expand_as(x))
    return y * scale.to(x.device, x.dtype).view(shape)


@dataclasses.dataclass(frozen=True)
class WeightSymmetry:
    """A batch of elements of the hidden-unit monomial group: ``perms[i]`` (B, n_{i+1}) long, ``scales[i]``
    (B, n_{i+1}) for the hidden layers 1..L-1 in (S1, S2) order."""

    perms: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]

    def act_layer(self, index: int, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S1, S2) on layer ``index`` (0-based) of a feature batch: weight (B, C, n_i, n_{i-1}, ...), bias
        (B, C, n_i)."""
        if index < len(self.perms):
            weight = _permute_scale(weight, 2, self.perms[index], self.scales[index])
            bias = _permute_scale(bias, 2, self.perms[index], self.scales[index])
        if index > 0:
            weight = _permute_scale(weight, 3, self.perms[index - 1], 1.0 / self.scales[index - 1])
        return weight, bias

    def inverse(self) -> WeightSymmetry:
        """``g^-1 = (pi^-1, 1 / d[pi^-1])``."""
        inv = tuple(torch.argsort(p, dim=1) for p in self.perms)
        return WeightSymmetry(inv, tuple(1.0 / s.gather(1, q) for s, q in zip(self.scales, inv)))


def random_symmetry(spec: NetworkSpec, batch: int, *, group: Symmetry = "positive", max_scale: float = 1e4,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None
                    ) -> WeightSymmetry:
    """Uniform permutations and, per hidden unit, ``d`` log-uniform in [1/max_scale, max_scale] (``"positive"``),
    uniform in {-1, +1} (``"sign"``) or 1 (``"permutation"``). Scales are float64."""
    if group not in SYMMETRIES:
        raise EquirayError(f"unknown symmetry {group!r}; choose one of {', '.join(SYMMETRIES)}")
    if max_scale < 1:
        raise EquirayError(f"max_scale bounds d to [1/max_scale, max_scale] and must be >= 1, got {max_scale}")
    perms, scales = [], []
    for n in spec.hidden_sizes:
        perms.append(torch.argsort(torch.rand(batch, n, generator=generator), dim=1).to(device))
        u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
        if group == "positive":
            s = torch.exp((2 * u - 1) * math.log(max_scale))
        elif group == "sign":
            s = torch.where(u < 0.5, -1.0, 1.0).double()
        else:
            s = torch.ones_like(u)
        scales.append(s.to(device))
    return WeightSymmetry(tuple(perms), tuple(scales))


def apply_symmetry(features: WeightSpaceFeatures, transform: WeightSymmetry) -> WeightSpaceFeatures:
    """``g . features`` by (S1, S2); every channel is transformed alike."""
    if len(transform.perms) != len(features) - 1:
        raise EquirayError(f"the transform has {len(transform.perms)} hidden layers, the features "
                           f"{len(features) - 1}; draw it with random_symmetry(spec, ...) for the same spec")
    out = [transform.act_layer(i, w, b) for i, (w, b) in enumerate(features)]
    return WeightSpaceFeatures(tuple(w for w, _ in out), tuple(b for _, b in out))
