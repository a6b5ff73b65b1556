"""The distillation config: which teacher, which student, how to train it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from equiray.errors import ConfigError
from equiray_pipelines._common import DataConfig, ScalingConfig, TrackingConfig

__all__ = ["DistillConfig", "DistillTrain", "StudentConfig"]


@dataclass(frozen=True)
class StudentConfig:
    name: str = "small_cnn"  # a member architecture or any timm model
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16, "support": "symmetric"})


@dataclass(frozen=True)
class DistillTrain:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.003
    temperature: float = 2.0
    hard_label_weight: float = 0.0  # add this much cross-entropy on the true labels
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("train: epochs, batch_size >= 1; lr, temperature > 0")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = "models:/equiray-ensemble@champion"
    data: DataConfig = DataConfig(max_train=4000)
    student: StudentConfig = StudentConfig()
    group: str | None = None  # default: the group the teacher was trained with
    # instead of the group's elements, each training image turned by its own random angle (so2), after a random
    # mirror too (o2), for teacher and student alike: a student of a rotation-robust (strong) ensemble
    rotations: str = "none"
    train: DistillTrain = DistillTrain()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig("equiray-distill", None, "equiray-student", "champion")
    max_eval: int = 2000
    storage_path: str = "runs"

    def __post_init__(self):
        from equiray.ensembles import ROTATIONS

        if self.rotations not in ROTATIONS:
            raise ConfigError(f"rotations: choose one of {', '.join(ROTATIONS)}, not {self.rotations!r}")
