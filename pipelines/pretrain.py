"""Pretrain a backbone on upright data with Ray Train and register it as ``equiray-backbone@pretrained``.

The offline stand-in for a hub checkpoint: later stages adapt, fine-tune and serve this model. Data streams
from the Parquet shards through Ray Data into ``TorchTrainer`` workers (``num_workers``, ``use_gpu`` and
fractional GPUs from the config); rank 0 logs each epoch to MLflow and reports a checkpoint to Ray Train; the
driver evaluates the final model on the upright test set, its C4-rotated views and corrupted views, logs the
model and registers it.

    python -m pipelines.pretrain --config configs/pretrain.yaml [--set train.epochs=2 ...]
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from equiray.config import to_dict
from equiray.data import read_split, split_files
from equiray.data.views import corruption_views, group_views
from equiray.errors import ConfigError
from equiray.groups import get_group
from equiray.models import create_model, is_model

from pipelines._common import (DataConfig, ScalingConfig, TrackingConfig, batches_from_shard, fit, load_shard,
                               progress, worker_threads)
from pipelines._ray import say

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet8"  # an equiray model or any timm name
    pretrained: bool = False  # timm hub weights (needs a network)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not is_model(self.name):
            raise ConfigError(f"model.name: unknown model {self.name!r} (equiray's own or any timm name)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    augment: str | None = None  # a group name (e.g. C4) for random group augmentation; None = upright only
    shuffle_buffer: int = 4096  # rows in each worker's local shuffle buffer

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train: epochs and batch_size must be >= 1 and lr > 0")
        if self.augment is not None:
            get_group(self.augment)


@dataclass(frozen=True)
class EvalConfig:
    group: str = "C4"  # rotated views of the test set, one per element
    corruptions: tuple[str, ...] = ("noise", "blur", "contrast")
    severity: int = 3

    def views(self) -> list[str]:
        return ["upright"] + group_views(self.group)[1:] + corruption_views(self.severity, self.corruptions)


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    storage_path: str = "runs"  # Ray Train checkpoints (shared or object storage on a cluster)


# ----------------------------------------------------------------------------------------- worker side
def build_model(cfg: dict, in_chans: int, num_classes: int) -> torch.nn.Module:
    m = cfg["model"]
    return create_model(m["name"], in_chans=in_chans, num_classes=num_classes, pretrained=m["pretrained"],
                        **m["kwargs"])


def _epoch_batches(cache, shard, t: dict, gen: torch.Generator):
    """This epoch's training batches: from the in-memory copy of the shard (reshuffled), or streamed."""
    if cache is None:
        return batches_from_shard(shard, t["batch_size"], t["shuffle_buffer"])
    x, y = cache
    perm = torch.randperm(len(y), generator=gen)
    return ((x[idx], y[idx]) for idx in perm.split(t["batch_size"]))


def _evaluate_shard(model, shard, batch_size: int, device) -> tuple[float, float]:
    """(correct, count) over this worker's shard, summed over workers when distributed."""
    import torch.distributed as dist

    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in batches_from_shard(shard, batch_size, None):
            pred = model(x.to(device)).argmax(-1)
            correct[0] += (pred == y.to(device)).sum()
            correct[1] += len(y)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    return float(correct[0]), float(correct[1])


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train loop: build the model, resume from a checkpoint if any, train epochs, report each one."""
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient

    from equiray.train import train_epoch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg["scaling"]["torch_threads"])
    t = cfg["train"]
    torch.manual_seed(t["seed"] + rank)
    model = build_model(cfg, cfg["in_chans"], cfg["num_classes"])
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t["epochs"])
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
    client = MlflowClient(cfg["tracking_uri"]) if rank == 0 else None
    augment = get_group(t["augment"]) if t["augment"] else None
    gen = torch.Generator().manual_seed(t["seed"] * 7919 + rank)
    cache = load_shard(ray.train.get_dataset_shard("train")) if cfg["data"]["in_memory"] else None
    for epoch in range(start_epoch, t["epochs"]):
        batches = _epoch_batches(cache, ray.train.get_dataset_shard("train"), t, gen)
        if rank == 0:
            batches = progress(batches, prefix="pretrain", total=-(-cfg["train_rows"] // (t["batch_size"] * world)),
                                desc=f"epoch {epoch + 1}/{t['epochs']}")
        stats = train_epoch(model, batches, opt, device=device, augment=augment, generator=gen)
        correct, count = _evaluate_shard(model, ray.train.get_dataset_shard("val"), 512, device)
        sched.step()
        metrics = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_accuracy": correct / max(count, 1), "epoch_seconds": stats.seconds,
                   "samples_per_second": stats.samples * world / stats.seconds, "lr": sched.get_last_lr()[0]}
        if rank == 0:
            say(f"[pretrain] epoch {epoch + 1}/{t['epochs']}  loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}"
                f"  val acc {metrics['val_accuracy']:.4f}  ({stats.seconds:.0f} s, "
                f"{metrics['samples_per_second']:.0f} samples/s)")
            for k, v in metrics.items():
                if k != "epoch":
                    client.log_metric(cfg["run_id"], k, float(v), step=epoch)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch}, Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ----------------------------------------------------------------------------------------- driver side
def run(cfg: PretrainConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Prepare data, train with Ray Train, evaluate, log everything to MLflow and register the model.

    With ``reuse``, a model already registered under the alias by the very same config is taken as it is
    (its run's metrics and plots are returned) instead of training again."""
    import mlflow
    import ray.data

    from pipelines import _tracking
    from pipelines._ray import cluster_summary, init_ray

    t0 = time.perf_counter()
    meta = cfg.data.prepare()
    data_dir = str(Path(cfg.data.dir).resolve())
    h, w, c = meta["shape"]
    uri = _tracking.tracking_uri()
    _tracking.setup(cfg.tracking.experiment, uri)
    cfg_hash = _tracking.config_hash(cfg)
    if reuse:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias, config_hash_value=cfg_hash)
        if mv is not None:
            log.info("reusing %s@%s (version %s): trained by this same config", cfg.tracking.registered_model,
                     cfg.tracking.alias, mv.version)
            return _result_from_registry(cfg, mv, uri, str(Path(cfg.data.dir).resolve()), report_dir)
    init_ray()
    log.info("Ray: %s", cluster_summary())

    train_ds = ray.data.read_parquet(split_files(data_dir, "train"))
    if cfg.data.max_train:
        train_ds = train_ds.limit(cfg.data.max_train)
    val_ds = ray.data.read_parquet(split_files(data_dir, "val"))

    run_name = cfg.tracking.run_name or f"pretrain-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(run_name=run_name) as active:
        run_id = active.info.run_id
        _tracking.log_config(cfg)
        mlflow.set_tags({"equiray.pipeline": "pretrain", "equiray.data": cfg.data.source})
        loop_cfg = {**to_dict(cfg), "in_chans": c, "num_classes": meta["num_classes"], "run_id": run_id,
                    "train_rows": min(meta["rows"]["train"], cfg.data.max_train or meta["rows"]["train"]),
                    "tracking_uri": uri}
        result = fit(train_loop_per_worker, loop_cfg, scaling=cfg.scaling, run_name=run_name,
                     storage_path=cfg.storage_path, datasets={"train": train_ds, "val": val_ds})
        model = build_model(loop_cfg, c, meta["num_classes"])
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["model"])
        train_seconds = time.perf_counter() - t0

        x, y = read_split(data_dir, "test", limit=cfg.data.max_eval)
        from equiray.train import evaluate_views

        views = cfg.eval.views()
        acc = evaluate_views(model, x, y, views)
        rot_views = [v for v in views if v.startswith("rot:") or v == "upright"]
        summary = {
            "test_accuracy": acc["upright"],
            f"test_{cfg.eval.group}_avg_accuracy": sum(acc[v] for v in rot_views) / len(rot_views),
            **{f"test_accuracy/{v.replace(':', '_')}": a for v, a in acc.items()},
            "train_seconds": train_seconds,
        }
        mlflow.log_metrics(summary)
        # Ray Train's metrics_dataframe keeps only the reports whose checkpoints are kept: read MLflow's history
        curves = _epoch_history(run_id)
        figures = _plots(curves, acc, Path(report_dir) if report_dir else None, cfg.eval.group)
        for fig_path in figures:
            mlflow.log_artifact(str(fig_path), "plots")
        spec = {"name": cfg.model.name, "in_chans": c, "num_classes": meta["num_classes"],
                "kwargs": dict(cfg.model.kwargs), "classes": meta["classes"], "input_shape": [c, h, w],
                "data": cfg.data.source}
        model_uri = _tracking.log_model(model, spec)
        version = _tracking.register(model_uri, cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"test_accuracy": f"{acc['upright']:.4f}", "run_id": run_id,
                                           "equiray.config_hash": cfg_hash})
    return {
        "run_id": run_id, "run_name": run_name, "model_uri": model_uri, "tracking_uri": uri,
        "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}", "version": version,
        "accuracy": acc, "summary": summary, "plots": [str(p) for p in figures], "data_dir": data_dir,
        "epochs": curves, "reused": False,
    }


def _epoch_history(run_id: str) -> list[dict]:
    """Per-epoch metrics of a run, one dict per epoch, from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient()
    keys = ("train_loss", "train_accuracy", "val_accuracy", "epoch_seconds")
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    return [{"epoch": step, **{k: history[k].get(step, float("nan")) for k in keys}}
            for step in sorted(history["train_loss"])]


def _result_from_registry(cfg: PretrainConfig, mv, uri: str, data_dir: str, report_dir) -> dict:
    """The same result dict as a fresh run, read back from the run behind a registered model version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    run_ = client.get_run(mv.run_id)
    metrics = run_.data.metrics
    acc = {v: metrics[f"test_accuracy/{v.replace(':', '_')}"] for v in cfg.eval.views()}
    epochs = _epoch_history(mv.run_id)
    plots = []
    if report_dir is not None:
        import shutil

        Path(report_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="plots", dst_path=tmp))
            plots = sorted(str(shutil.copy(p, Path(report_dir) / p.name)) for p in local.glob("*.png"))
    return {
        "run_id": mv.run_id, "run_name": run_.info.run_name, "model_uri": mv.source, "tracking_uri": uri,
        "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}", "version": str(mv.version),
        "accuracy": acc, "summary": {k: v for k, v in metrics.items() if k.startswith("test_") or k == "train_seconds"},
        "plots": plots, "data_dir": data_dir, "epochs": epochs, "reused": True,
    }


def _plots(curves: list[dict], acc: dict[str, float], out_dir: Path | None, group: str) -> list[Path]:
    """Training curves and accuracy per test view, as PNGs (in ``out_dir`` or a temporary folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if curves:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ep = [c["epoch"] + 1 for c in curves]
        ax[0].plot(ep, [c["train_loss"] for c in curves], marker="o")
        ax[0].set(xlabel="epoch", ylabel="train loss", title="loss")
        ax[1].plot(ep, [c["train_accuracy"] for c in curves], marker="o", label="train")
        ax[1].plot(ep, [c["val_accuracy"] for c in curves], marker="o", label="val")
        ax[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        ax[1].legend()
        fig.tight_layout()
        paths.append(out_dir / "pretrain_curves.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(acc)
    colors = ["tab:green" if n == "upright" else "tab:red" if n.startswith("rot") else "tab:orange" for n in names]
    ax.bar(range(len(names)), [acc[n] for n in names], color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set(ylim=(0, 1), ylabel="test accuracy", title=f"pretrained backbone: upright vs {group}-rotated vs corrupted")
    fig.tight_layout()
    paths.append(out_dir / "pretrain_views.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
