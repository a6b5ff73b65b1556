"""Pick the robust champion: every candidate model (the canon sweep's variants, the ensemble, the student, any
registered model) judged the same way on the full test set, upright, at any angle (SO(2)), mirrored and at any
angle (O(2)), on the C8 grid and along an accuracy-vs-angle curve; the best SO(2) accuracy that keeps the
backbone's upright accuracy (within a point; SO(2) within half a point of the best is level, and the better upright
of those wins) is registered as ``equiray-robust@champion``, the model
``equiray serve run`` serves by default.

    python -m equiray_pipelines.robust --config configs/robust.yaml

``config`` (the config dataclass), ``evaluate`` (the Ray task that judges one candidate), ``report`` (the rule,
the table, the verdict), ``stage`` (the stage and :func:`run`).
"""
from equiray_pipelines.robust.config import RobustConfig
from equiray_pipelines.robust.stage import RobustResult, RobustSelect, run

__all__ = ["RobustConfig", "RobustResult", "RobustSelect", "run"]
