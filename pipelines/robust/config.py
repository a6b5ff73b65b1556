"""The robust selection's config: which registered models compete, how they are judged, the champion rule."""
from __future__ import annotations

from dataclasses import dataclass

from equiray.errors import ConfigError
from equiray.groups import get_group
from equiray_pipelines._common import DataConfig, TrackingConfig

CANON_SWEEP = "canon"  # a candidate entry: every variant of the sweep behind `canon_model`; canon:URI: of the
#                        sweep behind that registered model (e.g. canon:models:/equiray-canon-any-angle@champion)
ANY_ANGLE_SWEEP = "canon:models:/equiray-canon-any-angle@champion"
TTA = "tta:"  # a candidate entry: tta:GROUP, the backbone averaged over GROUP's orbit at test time


@dataclass(frozen=True)
class RobustConfig:
    """Judge every candidate the same way (the full test set upright, mirrored, at a uniformly random angle per
    image (SO(2)), after a random mirror too (O(2)); the first ``curve_images`` on the ``cn_group`` grid and along
    an accuracy-vs-angle curve) and register the champion as ``equiray-robust@champion``.

    The rule: among the candidates whose upright accuracy is within ``upright_tolerance`` points of the
    backbone's, the best SO(2) accuracy; those within ``so2_level`` points of it count as level, and the better
    upright of them wins. When none keeps the upright accuracy, the best SO(2) accuracy overall
    is registered and the verdict says the rule was not met.
    """

    backbone: str = "models:/equiray-backbone@pretrained"  # the reference of the rule (also judged)
    # the any-angle recipe: the demo's any_angle stage (configs/canon_any_angle_fast.yaml) or the 15-minute one
    # (configs/canon_any_angle.yaml) registers it; a candidate not registered is left out, said so
    # (canon:...: the recipe, and its baseline and their mixture when its sweep trained them)
    candidates: tuple[str, ...] = (CANON_SWEEP, ANY_ANGLE_SWEEP, "tta:C8",
                                   "models:/equiray-ensemble@champion", "models:/equiray-student@champion")
    canon_model: str = "models:/equiray-canon@champion"  # whose sweep's variants `canon` stands for
    upright_tolerance: float = 1.0  # accuracy points
    # SO(2) accuracies within this many points of the best count as level (one seed's noise); the better upright of
    # those wins
    so2_level: float = 0.5
    data: DataConfig = DataConfig()  # max_eval None: the full test set
    cn_group: str = "C8"  # the papers' protocol: the mean over the group's rotated copies
    curve_step: float = 15.0  # degrees between the curve's angles (0: no curve)
    curve_images: int = 1000  # the curve and the Cn grid read the first N test images (one view per angle)
    seed: int = 0  # the random views' seed
    batch_size: int = 500
    latency_batch: int = 256
    tracking: TrackingConfig = TrackingConfig("equiray-robust", None, "equiray-robust", "champion")

    def __post_init__(self):
        if not self.candidates:
            raise ConfigError("candidates: name at least one registered model (models:/NAME@ALIAS) or canon")
        for c in self.candidates:
            if c.startswith(TTA):
                get_group(c[len(TTA):])
            elif c != CANON_SWEEP and not c.startswith(("models:/", "runs:/", f"{CANON_SWEEP}:models:/")):
                raise ConfigError(f"candidates: {c!r} is not models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH, "
                                  f"{CANON_SWEEP!r} (every variant of the canon sweep), {CANON_SWEEP}:models:/NAME@ALIAS "
                                  "(every variant of the sweep that registered it) or tta:GROUP (the backbone "
                                  "averaged over the group's orbit at test time, e.g. tta:C8)")
        if self.upright_tolerance < 0 or self.so2_level < 0:
            raise ConfigError(f"upright_tolerance, so2_level: accuracy points >= 0, not {self.upright_tolerance}, "
                              f"{self.so2_level}")
        get_group(self.cn_group)
        if self.curve_step < 0 or self.curve_images < 1 or self.batch_size < 1 or self.latency_batch < 1:
            raise ConfigError("curve_step >= 0 (0: no curve); curve_images, batch_size, latency_batch >= 1")

    def curve_angles(self) -> tuple[float, ...]:
        """The curve's angles in degrees, [0, 360) in ``curve_step`` steps (none when ``curve_step`` is 0)."""
        if not self.curve_step:
            return ()
        n = int(-(-360.0 // self.curve_step))
        return tuple(i * self.curve_step for i in range(n))
