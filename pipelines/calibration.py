"""Temperature scaling for every registered classifier, fitted where the stage template registers it.

One softmax temperature per registered version (:mod:`equiray.calibration`): fitted on the validation split under
the view of the inputs the model was trained for (upright for the backbone, a random pose for a model trained on
turned images, the target corruption for a robust fine-tune), then reported on the test split upright and at a
random angle (SO(2)), before and after. The version carries it as the tag
:data:`equiray_pipelines.tracking.TEMPERATURE_TAG` (the endpoint, ``equiray export`` and the demo's report read it) and the rest as ``calibration.*`` tags; the
stage's run gets the same as ``calibration_*`` metrics.
"""
from __future__ import annotations

from typing import Mapping

import torch

from equiray.data import resize
from equiray.data.views import apply_view
from equiray.train import predict
from equiray_pipelines.tracking import TEMPERATURE_TAG

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_TEST_VIEWS", "calibrate_model", "calibration_from_tags",
           "calibration_tags", "describe_calibration"]

CALIBRATION_TEST_VIEWS = ("upright", "so2")  # where ECE / NLL are reported before and after
# The most validation (fit) and test (report) images a stage reads to calibrate its model: one scalar fitted, an
# ECE read to about a point; the robust champion's own calibration reads the whole test set
CALIBRATION_IMAGES = 3000


@torch.no_grad()
def calibrate_model(uri: str, val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], *,
                    fit_view: str, seed: int, batch_size: int,
                    test_logits: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Temperature scaling for the registered model ``uri``: ``T`` fitted on the validation split under the view
    ``fit_view`` (seeded), then ECE (15 bins) and NLL before / after on the test split, upright and at a random
    angle (SO(2)). Keys ``temperature``, ``{view}_{ece,nll}_{before,after}``. ``test_logits``: the model's logits on
    those test views already (the robust stage's judge returns them), else computed."""
    from equiray.calibration import calibrate
    from equiray_pipelines import tracking

    model, spec = tracking.load_model(uri)
    size = spec.get("input_shape", val[0].shape[1:])[-1]

    def logits(images: torch.Tensor, view: str) -> torch.Tensor:
        return predict(model, resize(apply_view(images, view, seed=seed), size), batch_size=batch_size)

    t = calibrate(logits(val[0], fit_view), val[1]).temperature
    out = {"temperature": t}
    for view in CALIBRATION_TEST_VIEWS:
        seen = test_logits[view] if test_logits is not None else logits(test[0], view)
        c = calibrate(seen, test[1], temperature=t)
        out |= {f"{view}_ece_before": c.ece_before, f"{view}_ece_after": c.ece_after,
                f"{view}_nll_before": c.nll_before, f"{view}_nll_after": c.nll_after}
    return out


def calibration_tags(cal: Mapping[str, float], fit_view: str) -> dict[str, str]:
    """A calibration as the registered version's tags: the temperature under the tag the endpoint reads, the
    view it was fitted on, ECE / NLL before and after."""
    return {TEMPERATURE_TAG: f"{cal['temperature']:.6g}", "calibration.view": fit_view,
            **{f"calibration.{k}": f"{v:.4f}" for k, v in cal.items() if k != "temperature"}}


def calibration_from_tags(tags: Mapping[str, str]) -> dict[str, float | str]:
    """The inverse of :func:`calibration_tags` (a version's tags -> ``temperature``, ``view``, ECE / NLL); empty
    for an uncalibrated version."""
    if TEMPERATURE_TAG not in tags:
        return {}
    out: dict[str, float | str] = {"temperature": float(tags[TEMPERATURE_TAG])}
    for key, value in tags.items():
        if key.startswith("calibration."):
            name = key.removeprefix("calibration.")
            out[name] = value if name == "view" else float(value)
    return out


def describe_calibration(cal: Mapping[str, float | str]) -> str:
    """One line: the temperature, where it was fitted, ECE upright and SO(2) before -> after."""
    from equiray.data.views import describe_view

    where = f" (fitted on the validation split, {describe_view(str(cal['view']))})" if "view" in cal else ""
    line = f"calibration: temperature {cal['temperature']:.3f}{where}"
    eces = [f"{name} {100 * cal[f'{view}_ece_before']:.2f}% -> {100 * cal[f'{view}_ece_after']:.2f}%"
            for view, name in (("upright", "upright"), ("so2", "SO(2)")) if f"{view}_ece_before" in cal]
    if eces:
        line += "; ECE " + ", ".join(eces)
    if "so2_nll_before" in cal:
        line += f"; NLL SO(2) {cal['so2_nll_before']:.3f} -> {cal['so2_nll_after']:.3f}"
    return line
