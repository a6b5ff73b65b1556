"""The pretraining config: what to train (model), how (train), on what (data, scaling), how to judge it (eval)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from equiray.data.views import corruption_views, group_views
from equiray.errors import ConfigError
from equiray.groups import get_group
from equiray.models import is_model
from equiray_pipelines._common import DataConfig, ScalingConfig, TrackingConfig

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "PretrainConfig", "ScalingConfig", "TrackingConfig",
           "TrainConfig"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet8"  # an equiray model or any timm name
    pretrained: bool = False  # timm hub weights (needs a network)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not is_model(self.name):
            raise ConfigError(f"model.name: unknown model {self.name!r} (equiray's own or any timm name)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    augment: str | None = None  # a group name (e.g. C4) for random group augmentation; None = upright only
    shuffle_buffer: int = 4096  # rows in each worker's local shuffle buffer

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train: epochs and batch_size must be >= 1 and lr > 0")
        if self.augment is not None:
            get_group(self.augment)


@dataclass(frozen=True)
class EvalConfig:
    group: str = "C4"  # rotated views of the test set, one per element
    corruptions: tuple[str, ...] = ("noise", "blur", "contrast")
    severity: int = 3

    def views(self) -> list[str]:
        return ["upright"] + group_views(self.group)[1:] + corruption_views(self.severity, self.corruptions)

    def rotated_views(self) -> list[str]:
        """The upright view and its rotations: the views the group-averaged accuracy averages."""
        return [v for v in self.views() if v.startswith("rot:") or v == "upright"]


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    storage_path: str = "runs"  # Ray Train checkpoints (shared or object storage on a cluster)
