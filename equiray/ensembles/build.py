"""Members' initial weights: one seed per member, and optionally a G-invariant initial distribution."""
from __future__ import annotations

from typing import Literal, Sequence

import copy

import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.groups import Group, get_group
from equiray.models import freeze_batchnorm
from equiray.models.small import MaskedConv2d

from equiray.ensembles.stacked import MemberSpec, StackedEnsemble

Init = Literal["default", "invariant", "pretrained"]

__all__ = ["Init", "build_members", "member_seed", "symmetric_core"]


def member_seed(base: int, member_id: int) -> int:
    """The seed of member ``member_id`` of a run seeded ``base``: a member's weights, data order and augmentation
    depend on its id alone, not on the member group or worker that trains it."""
    return (base * 1_000_003 + member_id * 7919 + 17) % (2**63 - 1)


def symmetric_core(mask: torch.Tensor, group: Group) -> torch.Tensor:
    """Positions of a filter support whose whole orbit under ``group`` stays inside the support."""
    k = mask[None, None]  # (1, 1, kh, kw)
    core = mask.clone()
    for g in group.elements():
        core = core * group.act(k, g, padding="zeros")[0, 0].round()
    return core


def build_members(spec: MemberSpec, seeds: Sequence[int], *, init: Init = "default",
                  group: Group | str | None = None, pretrained: nn.Module | None = None) -> StackedEnsemble:
    """Members initialised each from its own seed (``torch.manual_seed(seed)`` before building it).
    ``init="invariant"`` makes the initial distribution G-invariant (condition (c)) where the support is not:
    weights outside the support's symmetric core (the positions whose whole orbit is in the support) start at
    zero; for symmetric supports this changes nothing. ``init="pretrained"``: every member a copy of
    ``pretrained`` (a model of ``spec``'s architecture, its BatchNorm folded when ``spec.frozen_bn``); the members
    then differ by their seeds' data order and augmentation alone (strong members: a backbone fine-tuned N ways).
    """
    if init == "pretrained":
        if pretrained is None:
            raise EquirayError("init='pretrained' needs the pretrained model to copy")
        pretrained = freeze_batchnorm(copy.deepcopy(pretrained)) if spec.frozen_bn else pretrained
    members = []
    for seed in seeds:
        torch.manual_seed(int(seed))
        m = spec.build()
        if init == "pretrained":
            try:
                m.load_state_dict(pretrained.state_dict())
            except RuntimeError as exc:
                raise EquirayError(f"the pretrained model is not a {spec.name} of this spec: "
                                   f"{str(exc).splitlines()[0]}") from None
        elif init == "invariant":
            if group is None:
                raise EquirayError("init='invariant' needs the group")
            g = get_group(group)
            with torch.no_grad():
                for conv in (c for c in m.modules() if isinstance(c, MaskedConv2d)):
                    conv.weight.mul_(symmetric_core(conv.mask, g))
        elif init != "default":
            raise EquirayError(f"unknown init {init!r}: choose 'default', 'invariant' or 'pretrained'")
        members.append(m)
    return StackedEnsemble(spec, len(members), members=members)
