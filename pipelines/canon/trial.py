"""What runs on Ray: one Tune trial builds, trains and evaluates one variant (:mod:`equiray.canon` does the
computing), logs it as an MLflow run nested under the sweep's, and reports to Tune.

Why trials train in the Tune function rather than in a ``TorchTrainer`` per trial: in Ray 2.60 a Train V2 run
inside a Tune trial keeps its worker group when the trial is stopped (Ray issue 54305), which stalls the next
trial on a small machine; a variant is a single-process job, so the trial is the worker (one CPU or a GPU
fraction each, from ``resources``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from equiray.canon import Variant, build_variant, evaluate_variant, train_variant
from equiray_pipelines.canon.config import CanonConfig
from equiray_pipelines.tracking import END_REASON, end_reason

__all__ = ["SweepRun", "run_trial"]


@dataclass(frozen=True)
class SweepRun:
    """Where a sweep's trials log: their MLflow runs nest under ``parent_run_id``."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def run_trial(config: Mapping, *, cfg: CanonConfig, data: tuple[torch.Tensor, ...],
              backbone: tuple[dict, dict], sweep: SweepRun) -> None:
    """One Tune trial: ``config["variant"]`` (a :class:`~equiray.canon.Variant` as a dict, the grid's point) on
    ``data`` = (train images, labels, test images, labels), starting from ``backbone`` = (spec, weights)."""
    import mlflow
    import ray
    import ray.tune

    from equiray_pipelines import tracking

    variant = Variant(**config["variant"])
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    x, y, xt, yt = data
    spec, state = backbone
    model, model_spec = build_variant(variant, spec, state, beta=cfg.train.beta, pose_snap=cfg.train.pose_snap,
                                      upright_backbone=cfg.train.upright_backbone, seed=cfg.train.seed,
                                      canonicalizer_kwargs=cfg.canonicalizers.kwargs(variant.kind))
    mlflow.set_tracking_uri(sweep.tracking_uri)
    client = mlflow.MlflowClient()
    run = client.create_run(sweep.experiment_id, run_name=variant.name,
                            tags={"mlflow.parentRunId": sweep.parent_run_id, "equiray.pipeline": "canon",
                                  "equiray.variant": variant.name})
    run_id = run.info.run_id
    for k, v in dataclasses.asdict(variant).items():
        client.log_param(run_id, f"variant.{k}", v)
    try:
        train_variant(model, variant, x, y, **cfg.train.options(variant), device=device,
                      on_epoch=_epoch_logger(client, run_id, variant, cfg.train.total_epochs(variant)))
        metrics = evaluate_variant(model, xt, yt, cfg.eval_group, device=device, angles=cfg.curve_angles())
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
        with mlflow.start_run(run_id=run_id):
            model_uri = tracking.log_model(model, model_spec)
    except Exception as exc:
        client.set_tag(run_id, END_REASON, end_reason(exc))
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    ray.tune.report({**metrics, "run_id": run_id, "model_uri": model_uri, "done": True})


def _epoch_logger(client, run_id: str, variant: Variant, epochs: int) -> Callable[[dict], None]:
    """Each epoch's row: to the variant's MLflow run, one progress line, and Tune."""
    import ray.tune

    from equiray_pipelines._ray import say

    def on_epoch(row: dict) -> None:
        for k, v in row.items():
            if k != "epoch":
                client.log_metric(run_id, k, float(v), step=row["epoch"])
        phase = " (pose)" if row.get("pose_phase") else ""
        say(f"[canon] {variant.name}: epoch {row['epoch'] + 1}/{epochs}{phase}  loss "
            f"{row['train_loss']:.3f}  acc {row['train_accuracy']:.3f}" +
            (f"  identity {row['train_identity_rate']:.2f}" if "train_identity_rate" in row else "") +
            f"  ({row['epoch_seconds']:.0f} s)")
        ray.tune.report({"epoch": row["epoch"], "train_loss": row["train_loss"]})

    return on_epoch
