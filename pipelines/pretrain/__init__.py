"""Pretrain a backbone on upright data with Ray Train and register it as ``equiray-backbone@pretrained``.

The offline stand-in for a hub checkpoint: later stages adapt, fine-tune and serve this model. Data streams
from the Parquet shards through Ray Data into ``TorchTrainer`` workers (``num_workers``, ``use_gpu`` and
fractional GPUs from the config); rank 0 logs each epoch to MLflow and reports a checkpoint to Ray Train; the
driver evaluates the final model on the upright test set, its C4-rotated views and corrupted views, logs the
model and registers it.

    python -m equiray_pipelines.pretrain --config configs/pretrain.yaml [--set train.epochs=2 ...]

``config`` (the config dataclasses), ``worker`` (what runs on Ray Train), ``stage`` (the stage and :func:`run`),
``report`` (summary metrics and plots).
"""
from equiray_pipelines.pretrain.config import (DataConfig, EvalConfig, ModelConfig, PretrainConfig, ScalingConfig,
                                               TrackingConfig, TrainConfig)
from equiray_pipelines.pretrain.stage import Pretrain, PretrainResult, run
from equiray_pipelines.pretrain.worker import build_model

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "Pretrain", "PretrainConfig", "PretrainResult",
           "ScalingConfig", "TrackingConfig", "TrainConfig", "build_model", "run"]
