"""The ensemble pipeline's configuration (``configs/ensemble.yaml``) and its cut into member groups."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from equiray.ensembles import ROTATIONS, MemberSpec
from equiray.errors import ConfigError
from equiray.groups import get_group
from equiray_pipelines._common import DataConfig, ScalingConfig, TrackingConfig


@dataclass(frozen=True)
class SettingConfig:
    name: str
    support: Literal["full", "symmetric", "asymmetric", "cross_corner"] = "symmetric"  # equiray.models.SUPPORTS
    augment: bool = True  # each sample turned by a uniformly random element of the ensemble's group
    init: Literal["default", "invariant"] = "default"
    # instead of the group's elements: each sample turned by its own uniformly random angle (so2), after a random
    # mirror too (o2); strong members (member.init_from) are trained this way
    rotations: Literal["none", "so2", "o2"] = "none"

    def __post_init__(self):
        if self.rotations not in ROTATIONS:
            raise ConfigError(f"setting {self.name!r}: rotations is one of {', '.join(ROTATIONS)}, not "
                              f"{self.rotations!r}")
        if self.rotations != "none" and self.augment:
            raise ConfigError(f"setting {self.name!r}: random rotations replace the group augmentation; set "
                              "augment: false")


DEFAULT_SETTINGS = (
    SettingConfig("symmetric+aug", "symmetric", True),
    SettingConfig("symmetric, no aug", "symmetric", False),
    SettingConfig("asymmetric+aug", "asymmetric", True),
    SettingConfig("asymmetric+aug, invariant init", "asymmetric", True, "invariant"),
)


@dataclass(frozen=True)
class MemberConfig:
    # small_cnn (equiray's compact member), nf_cnn (the paper's network: configs/ensemble_paper.yaml) or any
    # model without BatchNorm (with frozen_bn, any model)
    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    # strong members: every member a copy of this registered model (e.g. models:/equiray-backbone@pretrained),
    # fine-tuned its own way; its architecture replaces name, kwargs and the settings' support
    init_from: str | None = None
    frozen_bn: bool = False  # fold BatchNorm into trainable affine maps (a member with BatchNorm needs it)


@dataclass(frozen=True)
class EnsembleTrainSection:
    epochs: int = 3
    batch_size: int = 32  # per member, as in the paper
    lr: float = 0.01
    # the paper uses SGD (lr 0.01, 10 epochs); Adam is elementwise, so it commutes with the group's permutation
    # of filter entries and keeps the theorem's symmetry argument, and it learns far faster in a short run
    optimizer: Literal["sgd", "adam"] = "adam"
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train: epochs and batch_size must be >= 1 and lr > 0")


@dataclass(frozen=True)
class EnsembleTracking(TrackingConfig):
    experiment: str = "equiray-ensemble"
    registered_model: str = "equiray-ensemble"
    alias: str = "champion"
    champion: str | None = None  # the setting registered as the ensemble; default: the first setting


@dataclass(frozen=True)
class EnsembleEvalSection:
    max_eval: int = 2000  # test images (in distribution)
    off_manifold: str = "digits"  # another dataset, resized to the members' input size
    max_off_manifold: int = 1000
    repeats: int = 20  # bootstrap subsets per ensemble size
    sizes: tuple[int, ...] = ()  # default: 1, 2, 5, 10, 20, ... up to all members
    # "nfn": a registered metanetwork predicts every member's accuracy from its weights and the weakest
    # drop_fraction are left out of the average; compared with the whole ensemble and random subsets of that size
    select_by: Literal["none", "nfn"] = "none"
    nfn_model: str = "models:/equiray-nfn-members@champion"  # trained on a zoo of members (nfn_train_members.yaml)
    drop_fraction: float = 0.25

    def __post_init__(self):
        if not 0 < self.drop_fraction < 1:
            raise ConfigError(f"eval.drop_fraction must be in (0, 1), got {self.drop_fraction}")


@dataclass(frozen=True)
class GroupPlan:
    """One member group: its id, its setting (an index into ``settings``) and its members' global ids. The same
    in every run of a config, so a restarted worker finds its groups again."""

    gid: int
    setting: int
    members: tuple[int, ...]


@dataclass(frozen=True)
class EnsembleConfig:
    data: DataConfig = DataConfig(max_train=4000, resize=14)
    member: MemberConfig = MemberConfig()
    group: str = "C4"
    settings: tuple[SettingConfig, ...] = DEFAULT_SETTINGS
    members: int = 24  # per setting
    members_per_group: int = 8  # trained together, vectorized, by one worker
    train: EnsembleTrainSection = EnsembleTrainSection()
    scaling: ScalingConfig = ScalingConfig()
    tracking: EnsembleTracking = EnsembleTracking()
    eval: EnsembleEvalSection = EnsembleEvalSection()
    storage_path: str = "runs"
    max_failures: int = 2  # worker-group restarts Ray Train may do (from the latest checkpoint)
    # rounds between Ray Train checkpoints (each holds all of a worker's groups); 0: as many rounds as a worker
    # has groups, so a run checkpoints `epochs` times and writes each group once per epoch however many groups a
    # worker holds; a restart redoes at most that many rounds. 1 checkpoints every round: a restart loses less,
    # but a worker's checkpoint bytes then grow with the square of its groups
    checkpoint_every: int = 0

    def __post_init__(self):
        get_group(self.group)
        if self.members < 1 or self.members_per_group < 1:
            raise ConfigError("members and members_per_group must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every: rounds between checkpoints, >= 1 (or 0: one per pass over a "
                              f"worker's groups), not {self.checkpoint_every}")
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise ConfigError("settings: give at least one setting, with distinct names")
        if self.tracking.champion is not None and self.tracking.champion not in names:
            raise ConfigError(f"tracking.champion {self.tracking.champion!r} is not one of the settings {names}")

    def member_groups(self) -> list[GroupPlan]:
        """Every member group, settings one after the other, each cut into groups of ``members_per_group``."""
        groups = []
        for s in range(len(self.settings)):
            ids = [s * self.members + m for m in range(self.members)]
            for start in range(0, self.members, self.members_per_group):
                groups.append(GroupPlan(len(groups), s, tuple(ids[start:start + self.members_per_group])))
        return groups

    def member_kwargs(self, setting: SettingConfig) -> dict[str, Any]:
        """The member model's keyword arguments for one setting (its filter support overrides the member's; a
        copy of a registered model takes that model's, see :meth:`member_spec`)."""
        return {**self.member.kwargs, "support": setting.support}

    def member_spec(self, setting: SettingConfig, *, in_chans: int, num_classes: int,
                    pretrained_spec: dict | None = None) -> MemberSpec:
        """What a member of ``setting`` is: the configured model, or (``member.init_from``) the registered model's
        architecture, ``pretrained_spec`` being its registry spec."""
        if self.member.init_from is not None:
            if pretrained_spec is None:
                raise ConfigError(f"member.init_from {self.member.init_from}: its registry spec is needed")
            return MemberSpec(pretrained_spec["name"], dict(pretrained_spec.get("kwargs") or {}), in_chans,
                              num_classes, self.member.frozen_bn)
        return MemberSpec(self.member.name, self.member_kwargs(setting), in_chans, num_classes, self.member.frozen_bn)
