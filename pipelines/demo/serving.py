"""The demo's serve stage: the registered model behind Ray Serve, a few real HTTP requests, the answers."""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from equiray_pipelines.serve import ServeConfig


@dataclass(frozen=True, kw_only=True)
class ServeStageResult:
    url: str
    model: str
    version: str
    table: str
    requests: int
    seconds: float
    raw_png_label: str
    tracking_uri: str
    info: Mapping[str, Any] = field(default_factory=dict)  # the endpoint's /v1/model answer


def _png(img: torch.Tensor) -> bytes:
    """``(C, H, W)`` in [0, 1] -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((img.squeeze(0) * 255).round().byte().numpy()).save(buf, "PNG")
    return buf.getvalue()


def serve_stage(cfg: ServeConfig, data_dir: str, n: int) -> ServeStageResult:
    """Start the endpoint, send real requests (upright images as one multipart request, each rotated view as
    JSON pixel arrays, one raw PNG body), tabulate the answers, shut the endpoint down."""
    import ray
    import requests
    from ray import serve

    from equiray.data import read_meta, read_split
    from equiray_pipelines import tracking, serve as serving
    from equiray_pipelines._ray import started_local_ray

    x, y = read_split(data_dir, "test", limit=n)  # (n, C, H, W) in [0, 1]
    names = read_meta(data_dir)["classes"]
    t0 = time.perf_counter()
    shared = ray.is_initialized() and serving.serve_running() is not None  # other apps on this Serve: keep them
    ep = serving.deploy(cfg)
    try:
        url = ep["url"] + "/v1/predict"
        answers = {}
        res = requests.post(url, files=[("files", (f"test-{i}.png", _png(img), "image/png")) for i, img in enumerate(x)],
                            timeout=120)
        res.raise_for_status()
        answers[0] = res.json()["predictions"]
        for k in (1, 2, 3):
            rotated = torch.rot90(x, k, dims=(-2, -1))
            res = requests.post(url, json={"instances": rotated.squeeze(1).tolist()}, timeout=120)
            res.raise_for_status()
            answers[90 * k] = res.json()["predictions"]
        single = requests.post(url, data=_png(x[0]), headers={"Content-Type": "image/png"}, timeout=120)
        single.raise_for_status()
        info = requests.get(ep["url"] + "/v1/model", timeout=60).json()
    finally:
        # other apps on this Serve, or a local Ray this process started (it stops at exit, and Serve with it): only
        # this app goes. serve.shutdown() kills Serve's controller while its own graceful-shutdown task is still
        # queued, and the raylet reports that task as failed, a line on the driver at every clean demo
        serve.delete(cfg.app_name) if shared or started_local_ray() else serve.shutdown()
    return ServeStageResult(url=ep["url"], model=ep["model"], version=ep["version"], table=_answers_table(answers, y, names),
                            requests=6, seconds=time.perf_counter() - t0, info=info,
                            tracking_uri=tracking.tracking_uri(),
                            raw_png_label=single.json()["predictions"][0]["label"])


def _answers_table(answers: dict[int, list[dict]], y: torch.Tensor, names: list[str]) -> str:
    """One row per image: the label and confidence at each angle, and the model's own extras per angle (an
    ensemble's or a mixture's member disagreement, a canonicalizer's pose in degrees; a mixture has both)."""
    first = answers[0][0]
    extras = [k for k in ("disagreement", "pose_deg") if k in first]
    angles = " / ".join(str(deg) for deg in answers)
    head = ["image", "true label", *[f"{deg} deg" for deg in answers]] + [f"{k} ({angles})" for k in extras]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(len(y)):
        cells = [f"test {i}", names[int(y[i])]]
        cells += [f"{a[i]['label']} ({a[i]['probabilities'][a[i]['label']] * 100:.0f}%)" for a in answers.values()]
        for k in extras:
            cells.append(" / ".join(f"{a[i][k]:.2f}" if k == "disagreement" else f"{round(a[i][k]) % 360}"
                                    for a in answers.values()))  # a pose of 359.6 degrees reads 0
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
