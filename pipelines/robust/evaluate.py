"""What runs on Ray: one task judges one candidate model on every view of the test set, the same way for all."""
from __future__ import annotations

from typing import Sequence

import torch

from equiray.data import resize
from equiray.data.views import apply_view
from equiray.groups import get_group
from equiray.train import accuracy, predict
from equiray_pipelines.calibration import CALIBRATION_TEST_VIEWS

__all__ = ["CALIBRATION_VIEW", "FULL", "TEST_LOGITS", "curve_views", "grid_angles", "judge"]


FULL = ("upright", "reflect", "so2", "o2")  # on the whole test set
CALIBRATION_VIEW = "o2"  # the temperature is fitted on images as they really come: any angle, sometimes mirrored
TEST_LOGITS = "test_logits"  # judge()'s key: {view: (N, K) logits} of CALIBRATION_TEST_VIEWS


def grid_angles(cn_group: str) -> tuple[float, ...]:
    """The rotations of the ``cn_group`` grid in degrees (its reflections left out: the grid protocol turns)."""
    g = get_group(cn_group)
    return tuple(360.0 * k / g.n for k in range(g.n))


def curve_views(cn_group: str, angles: Sequence[float]) -> tuple[str, ...]:
    """The fixed-angle views read on the first test images: the curve's angles and the grid's (shared ones once)."""
    return tuple(f"angle:{d:g}" for d in sorted({*map(float, angles), *grid_angles(cn_group)}))


@torch.no_grad()
def judge(uri: str, x: torch.Tensor, y: torch.Tensor, *, cn_group: str, angles: Sequence[float], curve_images: int,
          seed: int, batch_size: int, tracking_uri: str, threads: int = 1) -> dict:
    """The accuracies of the registered model ``uri`` on ``(x, y)``: ``upright_accuracy``, ``mirrored_accuracy``,
    ``so2_accuracy``, ``o2_accuracy`` (seeded random views, the whole split), and on the first ``curve_images``:
    ``accuracy_angle_{deg}`` (the curve) and ``cn_avg_accuracy`` (the mean over the ``cn_group``'s rotations);
    under :data:`TEST_LOGITS` the logits of the views calibration reads on the test split (so the champion's are not
    computed twice).
    Every view is made at the data's resolution (pad, rotate, crop), then resized to the model's input, as the
    endpoint does."""
    import mlflow

    from equiray_pipelines import tracking

    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    model, spec = tracking.load_model(uri)
    size = spec.get("input_shape", x.shape[1:])[-1]

    def logits(view: str, images: torch.Tensor) -> torch.Tensor:
        return predict(model, resize(apply_view(images, view, seed=seed), size), batch_size=batch_size)

    def acc(view: str, images: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(logits(view, images), labels)

    kept = {view: logits(view, x) for view in CALIBRATION_TEST_VIEWS}
    full = {view: accuracy(kept[view], y) if view in kept else acc(view, x, y) for view in FULL}
    xc, yc = x[:curve_images], y[:curve_images]
    fixed = {float(view.split(":")[1]): acc(view, xc, yc) for view in curve_views(cn_group, angles)}
    grid = [fixed[a] for a in grid_angles(cn_group)]
    return {"upright_accuracy": full["upright"], "mirrored_accuracy": full["reflect"], "so2_accuracy": full["so2"],
            "o2_accuracy": full["o2"], "cn_avg_accuracy": sum(grid) / len(grid),
            **{f"accuracy_angle_{a:g}": fixed[float(a)] for a in angles}, TEST_LOGITS: kept}
