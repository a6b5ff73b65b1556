"""The configs of ``equiray nfn zoo`` (:class:`ZooConfig`) and ``equiray nfn train`` (:class:`NFNTrainConfig`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from equiray.config import from_dict, to_dict
from equiray.errors import ConfigError
from equiray.nfn import ZOO_ACTIVATIONS, ZOO_OPTIMIZERS, ZooHyperparameters, list_metanetworks
from equiray_pipelines._common import DataConfig, TrackingConfig

OPTIMIZERS = ZOO_OPTIMIZERS
ACTIVATIONS = ZOO_ACTIVATIONS
ZOOS = ("plain", "scaled")


# ----------------------------------------------------------------------------------------- nfn zoo
@dataclass(frozen=True)
class ZooSpace:
    """Per-net hyperparameter ranges ([low, high]; log-uniform for lr, weight decay and init std)."""

    activation: tuple[str, ...] = ("relu",)
    optimizer: tuple[str, ...] = OPTIMIZERS
    lr: tuple[float, float] = (5e-4, 5e-2)
    weight_decay: tuple[float, float] = (1e-8, 1e-2)
    dropout: tuple[float, float] = (0.0, 0.5)
    init_std: tuple[float, float] = (1e-3, 0.5)
    train_fraction: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self):
        if not self.activation or set(self.activation) - set(ACTIVATIONS):
            raise ConfigError(f"space.activation: choose from {list(ACTIVATIONS)}")
        if not self.optimizer or set(self.optimizer) - set(OPTIMIZERS):
            raise ConfigError(f"space.optimizer: choose from {list(OPTIMIZERS)}")
        for name in ("lr", "weight_decay", "dropout", "init_std", "train_fraction"):
            lo, hi = getattr(self, name)
            if not lo <= hi or lo < 0 or (name in ("lr", "weight_decay", "init_std") and lo <= 0):
                raise ConfigError(f"space.{name}: need 0 < low <= high, got [{lo}, {hi}]")
        if self.train_fraction[1] > 1 or self.dropout[1] >= 1:
            raise ConfigError("space: train_fraction <= 1 and dropout < 1")

    def sample(self, rng: np.random.Generator) -> ZooHyperparameters:
        """One net's recipe; draws from ``rng`` in field order (activation, optimizer, lr, ...)."""
        def log_uniform(lo, hi):
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

        return ZooHyperparameters(
            activation=str(rng.choice(self.activation)), optimizer=str(rng.choice(self.optimizer)),
            lr=log_uniform(*self.lr), weight_decay=log_uniform(*self.weight_decay),
            dropout=float(rng.uniform(*self.dropout)), init_std=log_uniform(*self.init_std),
            train_fraction=float(rng.uniform(*self.train_fraction)))


@dataclass(frozen=True)
class ZooConfig:
    data: DataConfig = DataConfig(max_train=6000, max_eval=2000)
    nets: int = 64
    nets_per_task: int = 8
    epochs: int = 2
    batch_size: int = 64
    space: ZooSpace = ZooSpace()
    seed: int = 0
    out: str = "data/zoo"  # Parquet shards of weights + hyperparameters + metrics
    overwrite: bool = False
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    # "latest" or an `ensemble train` run id: the zoo is that run's members instead (small_cnn nets; their
    # accuracy measured on the validation split, so the test split stays unseen by `ensemble eval --select-by nfn`)
    from_ensemble: str | None = None
    ensemble_experiment: str = "equiray-ensemble"

    def __post_init__(self):
        if self.nets < 1 or self.nets_per_task < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("nets, nets_per_task, epochs, batch_size: >= 1")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ConfigError("cpus_per_task > 0 and gpus_per_task >= 0")


# ----------------------------------------------------------------------------------------- nfn train
@dataclass(frozen=True)
class MonomialNFNOptions:
    """:class:`equiray.nfn.MonomialNFN`'s options; an option left out (None) takes the constructor's default,
    ``group`` the zoo's (positive scalings for ReLU nets, sign flips for tanh nets)."""

    hidden_channels: int | None = None
    num_layers: int | None = None
    mlp_hidden: tuple[int, ...] | None = None
    path_norms: bool | None = None
    group: Literal["positive", "sign"] | None = None


@dataclass(frozen=True)
class StatNNOptions:
    """:class:`equiray.nfn.StatNN`'s options; left out (None): the constructor's default."""

    mlp_hidden: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Metanetworks:
    """The metanetworks to fit, each with its options: one field per registered metanetwork, None = not fitted.

    YAML names them as registered (``monomial-nfn``, ``statnn``); a field's name is the registered name with
    ``_`` for ``-``. :meth:`parse` reads either spelling; unknown names and options are a :class:`ConfigError`."""

    monomial_nfn: MonomialNFNOptions | None = None
    statnn: StatNNOptions | None = None

    def __post_init__(self):
        if not self.names():
            raise ConfigError(f"metanetworks: choose at least one of {list_metanetworks()}")

    @staticmethod
    def registered_name(field_name: str) -> str:
        return field_name.replace("_", "-")

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Metanetworks:
        """From ``{registered name: options}``; where both spellings of a name are given (a partial section
        merged onto a default), the registered spelling wins."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"metanetworks: expected a mapping of metanetwork name -> options, got {raw!r}")
        fields = {cls.registered_name(f.name): f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in raw if k not in fields and k not in fields.values()]
        if unknown:
            raise ConfigError(f"metanetworks: unknown {sorted(unknown)}; choose from {list_metanetworks()}")
        data = {k: v for k, v in raw.items() if k in fields.values()}
        data.update({fields[k]: v for k, v in raw.items() if k in fields})
        return from_dict(cls, data, path="metanetworks")

    def names(self) -> tuple[str, ...]:
        """The registered names of the metanetworks to fit, in field order."""
        chosen = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        return tuple(self.registered_name(name) for name in chosen)

    def options(self, name: str) -> dict[str, Any]:
        """The options given for ``name`` as plain data (lists, not tuples), for its constructor and for MLflow."""
        opts = getattr(self, name.replace("-", "_"))
        return {k: v for k, v in to_dict(opts).items() if v is not None}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{registered name: options given}``: the YAML section as written."""
        return {name: self.options(name) for name in self.names()}


def _default_metanetworks() -> Metanetworks:
    return Metanetworks(monomial_nfn=MonomialNFNOptions(hidden_channels=16, num_layers=2, mlp_hidden=(32, 32),
                                                        path_norms=True),
                        statnn=StatNNOptions(mlp_hidden=(64, 64)))


@dataclass(frozen=True)
class NFNTrainConfig:
    zoo: str = "data/zoo"  # written by `equiray nfn zoo`
    # metanetwork name (equiray.nfn.list_metanetworks()) -> its options; a mapping is read into Metanetworks
    metanetworks: Metanetworks | Mapping[str, Any] = field(default_factory=_default_metanetworks)
    activation: str | None = None  # a mixed ReLU + tanh zoo: train on the nets with this activation only
    zoos: tuple[str, ...] = ZOOS  # "plain", and "scaled": every net's hidden units rescaled at random
    max_scale: float = 1e4  # scaled zoo: per hidden unit d log-uniform in [1/max_scale, max_scale]
    test_fraction: float = 0.25  # held-out nets, scored with Kendall tau
    val_fraction: float = 0.15  # picks the epoch kept (best validation tau)
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    tracking: TrackingConfig = TrackingConfig(experiment="equiray-nfn", registered_model="equiray-nfn",
                                              alias="champion")

    def __post_init__(self):
        if not isinstance(self.metanetworks, Metanetworks):
            object.__setattr__(self, "metanetworks", Metanetworks.parse(self.metanetworks))
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: choose from {list(ACTIVATIONS)} (or leave it out for a one-activation zoo)")
        if not self.zoos or set(self.zoos) - set(ZOOS):
            raise ConfigError(f"zoos: choose from {list(ZOOS)}")
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1):
            raise ConfigError("test_fraction and val_fraction in (0, 1), together < 1")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_scale < 1:
            raise ConfigError("epochs >= 1, batch_size >= 1, lr > 0, max_scale >= 1")
