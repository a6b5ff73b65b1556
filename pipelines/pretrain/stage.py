"""The pretraining stage: prepare data, train with Ray Train, evaluate on every test view, log to MLflow and
register the model (or, with ``reuse``, take the one this same config registered before)."""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from equiray.data import read_split, split_files
from equiray.train import evaluate_views
from equiray_pipelines import tracking
from equiray_pipelines._common import fit
from equiray_pipelines.pretrain.config import PretrainConfig
from equiray_pipelines.pretrain.report import plots, summary_metrics, view_accuracy
from equiray_pipelines.pretrain.worker import WorkerArgs, build_model, train_loop_per_worker
from equiray_pipelines.stage import Outcome, Stage, StageResult, StageRun

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_accuracy", "epoch_seconds")


@dataclass(frozen=True, kw_only=True)
class PretrainResult(StageResult):
    accuracy: Mapping[str, float]  # test accuracy per view: "upright", "rot:1", ..., "noise:3", ...
    metrics: Mapping[str, float]  # the run's summary metrics: test_accuracy, test_C4_avg_accuracy, train_seconds ...
    epochs: tuple[Mapping[str, float], ...]  # per epoch: epoch (from 0), train_loss, train/val_accuracy, seconds
    data_dir: str  # the prepared Parquet dataset (absolute)


class Pretrain(Stage[PretrainConfig, PretrainResult]):
    pipeline = "pretrain"

    def __init__(self, cfg: PretrainConfig, **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.started = time.perf_counter()  # train_seconds counts data preparation and Ray's start too
        self.meta: dict = {}

    @property
    def data_dir(self) -> str:
        return str(Path(self.cfg.data.dir).resolve())

    def check(self) -> None:
        self.meta = self.cfg.data.check()

    def default_run_name(self) -> str:
        return f"pretrain-{self.cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def tags(self) -> dict[str, str]:
        return {"equiray.data": self.cfg.data.source}

    def execute(self, run: StageRun) -> Outcome[PretrainResult]:
        import mlflow
        import ray.data

        cfg, meta = self.cfg, self.meta
        h, w, c = meta["shape"]
        train_ds = ray.data.read_parquet(split_files(self.data_dir, "train"))
        if cfg.data.max_train:
            train_ds = train_ds.limit(cfg.data.max_train)
        val_ds = ray.data.read_parquet(split_files(self.data_dir, "val"))
        args = WorkerArgs(in_chans=c, num_classes=meta["num_classes"], run_id=run.run_id,
                          train_rows=min(meta["rows"]["train"], cfg.data.max_train or meta["rows"]["train"]),
                          tracking_uri=run.tracking_uri)
        result = fit(train_loop_per_worker, {"cfg": cfg, "args": args}, scaling=cfg.scaling,
                     run_name=run.run_name, storage_path=cfg.storage_path, datasets={"train": train_ds, "val": val_ds},
                     data_dir=self.data_dir)
        model = build_model(cfg.model, in_chans=c, num_classes=meta["num_classes"])
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["model"])
        train_seconds = time.perf_counter() - self.started

        x, y = read_split(self.data_dir, "test", limit=cfg.data.max_eval)
        acc = evaluate_views(model, x, y, cfg.eval.views())
        metrics = summary_metrics(acc, cfg.eval, train_seconds)
        mlflow.log_metrics(metrics)
        # Ray Train's metrics_dataframe keeps only the reports whose checkpoints are kept: read MLflow's history
        curves = epoch_history(run.run_id)
        figures = plots(curves, acc, run.report_dir, cfg.eval.group)
        for fig_path in figures:
            mlflow.log_artifact(str(fig_path), "plots")
        spec = {"name": cfg.model.name, "in_chans": c, "num_classes": meta["num_classes"],
                "kwargs": dict(cfg.model.kwargs), "classes": meta["classes"], "input_shape": [c, h, w],
                "data": cfg.data.source}
        model_uri = tracking.log_model(model, spec)
        out = PretrainResult(pipeline=self.pipeline, run_id=run.run_id, run_name=run.run_name,
                             tracking_uri=run.tracking_uri, plots=tuple(str(p) for p in figures), accuracy=acc,
                             metrics=metrics, epochs=tuple(curves), data_dir=self.data_dir)
        return Outcome(out, model_uri, tags={"test_accuracy": f"{acc['upright']:.4f}", "run_id": run.run_id})

    def from_registry(self, mv, run: StageRun) -> PretrainResult:
        """The result of the run behind a registered model version, its plots copied into the report folder."""
        from mlflow import MlflowClient

        run_ = MlflowClient().get_run(mv.run_id)
        metrics = run_.data.metrics
        return PretrainResult(
            pipeline=self.pipeline, run_id=mv.run_id, run_name=run_.info.run_name, tracking_uri=run.tracking_uri,
            plots=_copy_plots(mv.run_id, run.report_dir), accuracy=view_accuracy(metrics, self.cfg.eval),
            metrics={k: v for k, v in metrics.items() if k.startswith("test_") or k == "train_seconds"},
            epochs=tuple(epoch_history(mv.run_id)), data_dir=self.data_dir)


def run(cfg: PretrainConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> PretrainResult:
    """Prepare data, train with Ray Train, evaluate, log everything to MLflow and register the model.

    With ``reuse``, a model already registered under the alias by the very same config is taken as it is
    (its run's metrics and plots are returned) instead of training again."""
    return Pretrain(cfg, report_dir=report_dir, reuse=reuse).run()


def epoch_history(run_id: str) -> list[dict[str, float]]:
    """Per-epoch metrics of a run, one dict per epoch, from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient()
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in EPOCH_METRICS}
    return [{"epoch": step, **{k: history[k].get(step, float("nan")) for k in EPOCH_METRICS}}
            for step in sorted(history["train_loss"])]


def _copy_plots(run_id: str, report_dir: Path | None) -> tuple[str, ...]:
    """The run's logged plots, copied into ``report_dir`` (none without one)."""
    import shutil

    import mlflow

    if report_dir is None:
        return ()
    report_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots", dst_path=tmp))
        return tuple(sorted(str(shutil.copy(p, report_dir / p.name)) for p in local.glob("*.png")))
