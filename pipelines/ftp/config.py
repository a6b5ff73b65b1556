"""The robust fine-tuning search's config: the transfer task, the search space, the searcher, the training."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from equiray.data.views import parse_view
from equiray.errors import ConfigError, EquirayError
from equiray.optim import OPTIMIZERS, method_knobs
from equiray_pipelines._common import DataConfig, ResourcesConfig, TrackingConfig

METHOD_ORDER = ("finetune", "l2sp", "ftp", "tpgm", "spd")  # the order of the table, the plot and the first points tried
# what a search compares unless told: FTP and the methods its paper compares with; SPD (the same group's 2024
# successor) joins with `space.methods: [..., spd]` (configs/ftp.yaml does)
DEFAULT_METHODS = METHOD_ORDER[:4]
UNIFORM = ("k",)  # searched uniformly (their range may start at 0); every other range log-uniformly


@dataclass(frozen=True)
class TaskConfig:
    target_view: str = "contrast:3"  # the ID domain: this view of the source images
    train_images: int = 2000  # the small labelled target set (TPGM holds out `tpgm_holdout` of it)
    val_images: int = 1000  # ID validation (from the val split): the only thing trials are selected on
    test_images: int = 2000
    ood_views: tuple[str, ...] = ("upright", "noise:3", "blur:3", "pixelate:3", "occlude:3")
    new_head: bool = True  # a freshly initialized classifier (excluded from the constraints)
    tpgm_holdout: int = 200

    def __post_init__(self):
        for v in (self.target_view, *self.ood_views):
            try:
                parse_view(v)
            except (ValueError, EquirayError) as exc:
                raise ConfigError(f"task: {exc}") from None
        if min(self.train_images, self.val_images, self.test_images) < 1 or not self.ood_views:
            raise ConfigError("task: train/val/test_images >= 1 and at least one OOD view")
        if not 0 < self.tpgm_holdout < self.train_images:
            raise ConfigError("task.tpgm_holdout: between 1 and train_images - 1")


@dataclass(frozen=True)
class SpaceConfig:
    """Search ranges ([low, high], sampled log-uniformly except k): ``lr`` and ``weight_decay`` for every method,
    then one range per knob of a method (:func:`equiray.optim.method_knobs`), which only that method reads."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    lr: tuple[float, float] = (1e-4, 3e-3)
    weight_decay: tuple[float, float] = (1e-5, 1e-1)
    k: tuple[float, float] = (0.0, 1.0)  # FTP: positive-gradient annealing (uniform)
    mu: tuple[float, float] = (1e-2, 1.0)  # FTP: radius learning rate (a radius grows ~mu per step)
    gamma_init: tuple[float, float] = (1e-8, 1e-4)  # FTP: initial radius
    alpha: tuple[float, float] = (1e-4, 1.0)  # L2-SP: pull to the pretrained weights
    beta: tuple[float, float] = (1e-5, 1e-2)  # L2-SP: on the new head
    radius_lr: tuple[float, float] = (1e-3, 1e-1)  # TPGM: radius learning rate on the held-out batch
    strength: tuple[float, float] = (0.1, 3.0)  # SPD: the paper's lambda (1: an inconsistent step adds no deviation)

    def __post_init__(self):
        unknown = {m for m in self.methods if m not in OPTIMIZERS}
        if unknown or not self.methods:
            raise ConfigError(f"space.methods: unknown {sorted(unknown)}; choose from {list(METHOD_ORDER)}")
        ranges = self.ranges()
        for m in self.methods:
            missing = [k for k in method_knobs(m) if k not in ranges]
            if missing:
                raise ConfigError(f"space: no range for {m}'s knob(s) {missing}")
        for name, (lo, hi) in ranges.items():
            if not lo <= hi or (name not in UNIFORM and lo <= 0):
                raise ConfigError(f"space.{name}: need 0 < low <= high, got [{lo}, {hi}]")

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Every searched value's range, in field order (the order the search space is built in)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "methods"}

    def defaults(self, method: str) -> dict:
        """The first point tried for a method: the geometric middle of each range (the middle for uniform ones)."""
        ranges = self.ranges()
        mid = {n: math.sqrt(a * b) for n, (a, b) in ranges.items() if n not in UNIFORM}
        return {"method": method, **mid, **{n: sum(ranges[n]) / 2 for n in UNIFORM}}

    def tune_space(self) -> dict:
        from ray import tune

        ranges = self.ranges()
        space = {"method": tune.choice(list(self.methods)), **{n: tune.uniform(*ranges[n]) for n in UNIFORM}}
        for n, (lo, hi) in ranges.items():
            if n not in UNIFORM:
                space[n] = tune.loguniform(lo, hi) if hi > lo else lo
        return space


def method_params(config: Mapping[str, Any]) -> dict:
    """The values a trial's method actually uses, from its Tune config (what its MLflow run records): the method,
    ``lr``, ``weight_decay`` and the method's own knobs."""
    m = config["method"]
    return {"method": m, "lr": config["lr"], "weight_decay": config["weight_decay"],
            **{k: config[k] for k in method_knobs(m)}}


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int = 12
    searcher: str = "optuna"  # optuna (TPE; random search if optuna is not installed) | random
    scheduler: str = "asha"  # asha | none
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it (constrained methods start slower)
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many as the resources allow
    seed: int = 0

    def __post_init__(self):
        if self.searcher not in ("optuna", "random") or self.scheduler not in ("asha", "none"):
            raise ConfigError("search: searcher is optuna|random, scheduler is asha|none")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("search: num_samples >= 1, grace_period >= 1, reduction_factor >= 2")


@dataclass(frozen=True)
class FTPTrain:
    epochs: int = 6
    batch_size: int = 64
    base: str = "adamw"  # adamw | sgd (the optimizer every method wraps)
    projection_interval: int = 10  # TPGM: fit the radii on a held-out batch every this many steps

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.projection_interval < 1:
            raise ConfigError("train: epochs, batch_size, projection_interval >= 1")
        if self.base not in ("adamw", "sgd"):
            raise ConfigError("train.base: adamw or sgd")


@dataclass(frozen=True)
class FTPConfig:
    backbone: str = "models:/equiray-backbone@pretrained"
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    space: SpaceConfig = SpaceConfig()
    search: SearchConfig = SearchConfig()
    train: FTPTrain = FTPTrain()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig("equiray-ftp", None, "equiray-ftp", "champion")
    storage_path: str = "runs"
    name: str | None = None  # the Tune experiment's name under storage_path (default: ftp-<config hash>)
    resume: bool = False  # continue the experiment of this name (`--resume`)
