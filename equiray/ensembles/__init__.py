"""Augmentation ensembles (Nordenfors & Flinth 2024): many members of one architecture, trained at once.

The theorem behind them: if (a) the architecture's set of layers is closed under the group G (e.g. a filter
support that rotations map to itself), (b) the loss is invariant, (c) the initial weights are drawn from a
G-invariant distribution, and (d) each sample gets a uniformly random group element in SGD, then the
*distribution* of trained weights stays G-invariant, so the infinite ensemble mean is exactly equivariant at
every training time, on and off the data manifold. Members are not; finite ensembles approach it as N grows.

- :mod:`~equiray.ensembles.stacked`: :class:`StackedEnsemble`, N members as one vectorized module (and the
  registry model ``ensemble``);
- :mod:`~equiray.ensembles.build`: members' initial weights (:func:`build_members`, :func:`member_seed`,
  condition (c)'s :func:`symmetric_core`);
- :mod:`~equiray.ensembles.training`: the vectorized epoch (:func:`train_members_epoch`) and a member group's
  whole training state (:class:`MemberGroup`);
- :mod:`~equiray.ensembles.storage`: a trained member group as safetensors + JSON.
"""
from equiray.ensembles.build import Init, build_members, member_seed, symmetric_core
from equiray.ensembles.stacked import CHUNK_ELEMENTS, MemberSpec, StackedEnsemble  # registers `ensemble`
from equiray.ensembles.storage import load_group, save_group
from equiray.ensembles.training import (MEMBER_OPTIMIZERS, ROTATIONS, MemberGroup, member_batches,
                                       train_members_epoch)

__all__ = ["CHUNK_ELEMENTS", "Init", "MEMBER_OPTIMIZERS", "ROTATIONS", "MemberGroup", "MemberSpec", "StackedEnsemble",
           "build_members", "load_group", "member_batches", "member_seed", "save_group",
           "symmetric_core", "train_members_epoch"]
