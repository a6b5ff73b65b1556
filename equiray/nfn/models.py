"""Metanetworks, features -> (B, out_dim): the invariant Monomial-NFN, the STATNN baseline, the path-norm
invariants, and the registry that names them for configs (``create_metanetwork("monomial-nfn", spec, ...)``)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.nfn.layers import FeatureActivation, MonomialInvariantPool, MonomialLinear
from equiray.nfn.spec import SCALING_GROUPS, NetworkSpec, ScalingGroup, WeightSpaceFeatures
from equiray.registry import Registry


PATH_NORM_POWERS: tuple[float, ...] = (1.0, 2.0)


def path_norms(features: WeightSpaceFeatures, powers: Sequence[float] = PATH_NORM_POWERS) -> torch.Tensor:
    """Invariant path statistics: exact invariants of hidden-unit permutations, positive scalings and sign flips.

    With ``A_i = sum_kernel |W_i|^p``: forward ``v_0 = 1``, ``v_i = A_i v_{i-1} + |b_i|^p``; backward ``u_L = 1``,
    ``u_{i-1} = A_i^T u_i``. Under (S1, S2) ``v_i[j]`` picks up ``|d_i[j]|^p`` and ``u_i[j]`` its inverse, both
    permuted with layer i, so the l_p path norms ``v_L`` and the flow ``v_i * u_i`` through each hidden unit are
    unchanged up to that permutation. Returned per power and feature channel: ``log v_L / p`` (n_L values) and,
    per hidden layer, the mean, standard deviation, min and max over its units of ``log(v_i u_i) / p``:
    ``(B, C * len(powers) * (n_L + 4 (L - 1)))``.

    They keep what the entry-wise normalisation of :class:`MonomialInvariantPool` removes together with the
    symmetric part: the overall scale of a net's function and how it spreads over units (a net that barely
    trained has small path norms). Products along paths are also the coupling of consecutive layers that the
    equivariant layers themselves do not have.
    """
    tiny = torch.finfo(features.dtype).tiny
    out = []
    for p in powers:
        mats = []
        for w in features.weights:
            a = w.abs().pow(p)
            mats.append(a.flatten(4).sum(-1) if a.dim() > 4 else a)  # (B, C, n_i, n_{i-1})
        v = torch.ones(*mats[0].shape[:2], mats[0].shape[3], dtype=features.dtype, device=features.device)
        forward = []
        for a, b in zip(mats, features.biases):
            v = torch.einsum("bcjk,bck->bcj", a, v) + b.abs().pow(p)  # (B, C, n_i)
            forward.append(v)
        u = torch.ones_like(forward[-1])
        stats = [torch.log(forward[-1].clamp_min(tiny)) / p]  # (B, C, n_L)
        for i in range(len(mats) - 1, 0, -1):
            u = torch.einsum("bcjk,bcj->bck", mats[i], u)  # (B, C, n_{i-1}): paths from each unit to the outputs
            flow = torch.log((forward[i - 1] * u).clamp_min(tiny)) / p
            stats.append(torch.stack([flow.mean(-1), flow.std(-1), flow.amin(-1), flow.amax(-1)], -1))
        out.append(torch.cat(stats, dim=-1).flatten(1))
    return torch.cat(out, dim=1)


def path_norm_dim(spec: NetworkSpec, channels: int, powers: Sequence[float] = PATH_NORM_POWERS) -> int:
    """The width of :func:`path_norms`' output for features fitting ``spec`` with ``channels`` channels."""
    return channels * len(powers) * (spec.layers[-1].out_features + 4 * (spec.num_layers - 1))


# ----------------------------------------------------------------------------------------- metanetworks
def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class MonomialNFN(nn.Module):
    """Invariant Monomial-NFN: ``num_layers`` x (MonomialLinear, ReLU|tanh), the invariant pool, an MLP head.

    ``group="positive"`` for ReLU zoos (invariant to hidden-unit permutations and positive scalings),
    ``"sign"`` for tanh zoos (permutations and sign flips). Input: :class:`WeightSpaceFeatures` fitting ``spec``
    with ``in_channels`` channels. Output (B, out_dim), e.g. predicted test accuracy.
    """

    def __init__(self, spec: NetworkSpec, *, group: ScalingGroup = "positive", in_channels: int = 1,
                 hidden_channels: int = 16, num_layers: int = 2, mlp_hidden: Sequence[int] = (32, 32),
                 out_dim: int = 1, path_norms: bool = False):
        super().__init__()
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        if num_layers < 1 or hidden_channels < 1:
            raise EquirayError(f"need num_layers >= 1 and hidden_channels >= 1, got {num_layers}, {hidden_channels}")
        self.spec, self.group, self.in_channels = spec, group, in_channels
        act = torch.relu if group == "positive" else torch.tanh
        layers: list[nn.Module] = []
        s, c = spec, in_channels
        for _ in range(num_layers):
            layer = MonomialLinear(s, c, hidden_channels, group=group)
            layers += [layer, FeatureActivation(act)]
            s, c = layer.out_spec, hidden_channels
        self.equivariant = nn.Sequential(*layers)
        self.pool = MonomialInvariantPool(s, hidden_channels, group=group)
        self.path_norms = bool(path_norms)
        extra = path_norm_dim(spec, in_channels) if self.path_norms else 0
        self.head = _mlp(self.pool.out_dim + extra, mlp_hidden, out_dim)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        pooled = self.pool(self.equivariant(features))  # (B, pool.out_dim)
        if self.path_norms:
            pooled = torch.cat([pooled, path_norms(features)], dim=1)
        return self.head(pooled)  # (B, out_dim)


class StatNN(nn.Module):
    """STATNN baseline (Unterthiner et al. 2020): mean, variance and the 0/25/50/75/100% quantiles of every
    ``W_i`` and ``b_i`` -> MLP. Invariant to permutations, not to scalings."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: NetworkSpec, *, in_channels: int = 1, mlp_hidden: Sequence[int] = (64, 64),
                 out_dim: int = 1):
        super().__init__()
        self.spec, self.in_channels = spec, in_channels
        self.head = _mlp(2 * spec.num_layers * (2 + len(self.QUANTILES)), mlp_hidden, out_dim)

    @classmethod
    def statistics(cls, features: WeightSpaceFeatures) -> torch.Tensor:
        stats = []
        for t in features.weights + features.biases:
            flat = t.flatten(1)  # (B, C * prod(shape))
            q = torch.tensor(cls.QUANTILES, dtype=flat.dtype, device=flat.device)
            stats += [flat.mean(1, keepdim=True), flat.var(1, keepdim=True), torch.quantile(flat, q, dim=1).T]
        return torch.cat(stats, dim=1)  # (B, 2L * 7)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        self.spec.check(features, channels=self.in_channels)
        return self.head(self.statistics(features))


# ----------------------------------------------------------------------------------------- registry
METANETWORKS: Registry[Callable[..., nn.Module]] = Registry("metanetwork")
"""``name -> factory(spec, **options) -> nn.Module`` (features -> (B, out_dim))."""


def register_metanetwork(name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Register ``factory(spec, **kwargs) -> nn.Module`` (features -> (B, out_dim)) under ``name``; replacing a
    registered name needs ``overwrite=True``."""
    METANETWORKS.register(factory, name=name, overwrite=overwrite)


register_metanetwork("monomial-nfn", MonomialNFN)
register_metanetwork("statnn", StatNN)


def list_metanetworks() -> list[str]:
    return METANETWORKS.names()


def create_metanetwork(name: str, spec: NetworkSpec, **kwargs) -> nn.Module:
    """The metanetwork registered as ``name`` for networks of ``spec``; an unknown name or option is an
    :class:`EquirayError` naming the registered metanetworks or the options given."""
    return METANETWORKS.create(name, spec, **kwargs)
