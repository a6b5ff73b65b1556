"""Distil the registered ensemble into one student for cheap serving; register it as ``equiray-student@champion``.

The student matches the ensemble mean's softened outputs on *group-transformed* inputs (each sample its own
uniformly random element), so it learns the ensemble's behaviour on the whole orbit. A student carries no
invariance guarantee: it is measured with the same OSP / symmetric KL as the ensemble, next to it, with both
models' inference cost (the objective and the measures are :mod:`equiray.distill`).

    python -m equiray_pipelines.distill --config configs/distill.yaml

``config`` (the config dataclasses), ``worker`` (what runs on Ray Train), ``stage`` (the stage and :func:`run`),
``report`` (the teacher-vs-student table).
"""
from equiray_pipelines.distill.config import DistillConfig, DistillTrain, StudentConfig
from equiray_pipelines.distill.stage import Distill, DistillResult, run

__all__ = ["Distill", "DistillConfig", "DistillResult", "DistillTrain", "StudentConfig", "run"]
