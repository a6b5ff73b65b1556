"""Test-time averaging over a group's orbit: the simplest invariant model built from any backbone, and the peer
every learned symmetry method is measured against (``|G|`` forward passes per input)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from equiray.errors import ConfigError
from equiray.groups import Group, get_group
from equiray.models._registry import create_model, register_model

__all__ = ["OrbitAveraged", "averaged", "coset_representatives", "orbit_averaged", "parse_orbit"]


class OrbitAveraged(nn.Module):
    """``backbone`` on every transformed copy ``g.x`` of the input, its class probabilities averaged over the
    group. Returns the log of that mean (a softmax of it gives the mean back), so it is invariant to the group by
    construction; ``padding`` fills the corners a rotation by other than 90 degrees brings in.

    ``modulo``: a subgroup ``H`` of ``group`` the backbone is already invariant to (a canonicalized model to its
    canonicalizer's group, say): one copy per coset ``gH`` instead of one per element, the same average for such a
    backbone at ``|G|/|H|`` passes. ``OrbitAveraged(recipe, "C16", modulo="C8")`` reads a C8-invariant model at 0 and
    22.5 degrees; the average is exactly invariant to ``group`` only when the backbone is exactly invariant to ``H``.
    """

    def __init__(self, backbone: nn.Module, group: str = "C8", *, padding: str = "zeros", modulo: str | None = None):
        super().__init__()
        self.backbone, self.group, self.padding = backbone, get_group(group), padding
        self.modulo = None if modulo is None else get_group(modulo)
        self.register_buffer("copies", coset_representatives(self.group, self.modulo), persistent=False)

    def _copies(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*n, C, H, W)``: the n copies of each image adjacent, the identity's first."""
        b, n = x.shape[0], len(self.copies)
        if n == self.group.order:
            return self.group.orbit(x, padding=self.padding).flatten(0, 1)
        return self.group.act(x.repeat_interleave(n, dim=0), self.copies.to(x.device).repeat(b), padding=self.padding)

    def _mean(self, logits: torch.Tensor, b: int) -> torch.Tensor:
        logp = logits.float().log_softmax(-1).view(b, len(self.copies), -1)
        return torch.logsumexp(logp, dim=1) - math.log(len(self.copies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mean(self.backbone(self._copies(x)), x.shape[0])

    def forward_with_info(self, x: torch.Tensor):
        """For a backbone that tells what it did (a canonicalized model's ``forward_with_info``): the averaged
        output and the backbone's info on the inputs as they came (its batch-sized tensors; the other copies'
        are dropped)."""
        b, n = x.shape[0], len(self.copies)
        out, info = self.backbone.forward_with_info(self._copies(x))
        first = {f.name: v[::n] for f in dataclasses.fields(info)
                 if isinstance(v := getattr(info, f.name), torch.Tensor) and v.dim() and v.shape[0] == b * n}
        return self._mean(out, b), dataclasses.replace(info, **first)


def coset_representatives(group: Group, subgroup: Group | None = None) -> torch.Tensor:
    """One element of ``group`` per left coset ``gH`` of ``subgroup`` (all elements when it is None), the first of
    each coset in ``group``'s canonical order. ``subgroup`` must sit inside ``group``: its rotation step a multiple of
    ``group``'s (``n_H`` divides ``n_G``) and reflections only if ``group`` has them."""
    if subgroup is None:
        return torch.arange(group.order)
    if group.n % subgroup.n or (subgroup.reflections and not group.reflections):
        raise ConfigError(f"modulo: {subgroup.name} is not a subgroup of {group.name} (C<m> or D<m> with m dividing "
                          f"{group.n}{'' if group.reflections else ', no reflections'})")
    step = group.n // subgroup.n  # H's rotations in G's steps

    def in_subgroup(e: torch.Tensor) -> bool:
        return int(group.rotation(e)) % step == 0 and (subgroup.reflections or int(group.reflection(e)) == 0)

    reps: list[int] = []
    for g in group.elements():
        if not any(in_subgroup(group.compose(group.inverse(r), g)) for r in reps):
            reps.append(g)
    return torch.tensor(reps)


def parse_orbit(text: str | None) -> tuple[str, str | None] | None:
    """``"D16/D8"`` -> ``("D16", "D8")`` (one copy per coset of D8 in D16), ``"D1"`` -> ``("D1", None)``, empty or
    None -> None; ConfigError when a name is not a group or the subgroup is not inside the group."""
    if not text or not str(text).strip():
        return None
    group, _, modulo = str(text).strip().partition("/")
    try:
        g, h = get_group(group), get_group(modulo) if modulo else None
    except ValueError as exc:
        raise ConfigError(f"test-time averaging {text!r}: {exc}") from None
    coset_representatives(g, h)  # the subgroup check
    return g.name, None if h is None else h.name


def averaged(model: nn.Module, orbit: str | None) -> nn.Module:
    """``model`` averaged at test time over ``orbit`` (``"G"`` or ``"G/H"``, :func:`parse_orbit`), or ``model``
    itself when ``orbit`` is empty."""
    parsed = parse_orbit(orbit)
    if parsed is None:
        return model
    return OrbitAveraged(model, parsed[0], modulo=parsed[1])


@register_model
def orbit_averaged(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
                   backbone: str = "resnet8", backbone_kwargs: dict | None = None, group: str = "C8",
                   padding: str = "zeros", modulo: str | None = None) -> nn.Module:
    """A backbone (equiray or timm name, or any registered equiray model with its ``backbone_kwargs``) averaged
    over ``group``'s orbit at test time (one copy per coset of ``modulo``: see :class:`OrbitAveraged`), as one
    model."""
    net = create_model(backbone, in_chans=in_chans, num_classes=num_classes, pretrained=pretrained,
                       **dict(backbone_kwargs or {}))
    return OrbitAveraged(net, group, padding=padding, modulo=modulo)
