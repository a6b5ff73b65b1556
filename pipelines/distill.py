"""Distil the registered ensemble into one student for cheap serving; register it as ``equiray-student@champion``.

The student matches the ensemble mean's softened outputs on *group-transformed* inputs (each sample its own
uniformly random element), so it learns the ensemble's behaviour on the whole orbit. A student carries no
invariance guarantee: it is measured with the same OSP / symmetric KL as the ensemble, next to it, with both
models' inference cost.

    python -m pipelines.distill --config configs/distill.yaml
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
import torch.nn.functional as F

from equiray.config import to_dict
from equiray.errors import ConfigError
from pipelines._common import DataConfig, ScalingConfig, TrackingConfig, fit, load_shard, resize, worker_threads
from pipelines._ray import say

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentConfig:
    name: str = "small_cnn"  # a member architecture or any timm model
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16, "support": "symmetric"})


@dataclass(frozen=True)
class DistillTrain:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 0.003
    temperature: float = 2.0
    hard_label_weight: float = 0.0  # add this much cross-entropy on the true labels
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise ConfigError("train: epochs, batch_size >= 1; lr, temperature > 0")


@dataclass(frozen=True)
class DistillConfig:
    teacher: str = "models:/equiray-ensemble@champion"
    data: DataConfig = DataConfig(max_train=4000)
    student: StudentConfig = StudentConfig()
    group: str | None = None  # default: the group the teacher was trained with
    train: DistillTrain = DistillTrain()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig("equiray-distill", None, "equiray-student", "champion")
    max_eval: int = 2000
    storage_path: str = "runs"


def distill_loss(student_logits, teacher_logits, labels, *, temperature: float, hard_weight: float):
    """Hinton's soft-target loss ``T^2 KL(softmax(t/T) || softmax(s/T))`` plus optional hard-label CE."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t
    return soft + hard_weight * F.cross_entropy(student_logits, labels) if hard_weight else soft


def train_loop_per_worker(cfg: dict) -> None:
    import mlflow
    import ray.train
    import ray.train.torch

    from equiray.groups import get_group
    from equiray.models import create_model
    from pipelines import _tracking

    worker_threads(cfg["scaling"]["torch_threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    mlflow.set_tracking_uri(cfg["tracking_uri"])
    device = ray.train.torch.get_device()
    teacher, spec = _tracking.load_model(cfg["teacher"], device=device)
    size = spec["input_shape"][-1]
    group = get_group(cfg["group"])
    x, y = load_shard(ray.train.get_dataset_shard("train"), size=size, limit=cfg["data"]["max_train"])
    torch.manual_seed(cfg["train"]["seed"] + rank)
    s = cfg["student"]
    student = create_model(s["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"], **s["kwargs"])
    student = ray.train.torch.prepare_model(student)
    opt = torch.optim.Adam(student.parameters(), lr=cfg["train"]["lr"])
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        (student.module if hasattr(student, "module") else student).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
    gen = torch.Generator().manual_seed(cfg["train"]["seed"] * 31 + rank)
    t = cfg["train"]
    for epoch in range(start, t["epochs"]):
        student.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(y), generator=gen).split(t["batch_size"]):
            xb = group.act(x[idx], group.sample(len(idx), generator=gen)).to(device)
            yb = y[idx].to(device)
            with torch.no_grad():
                target = teacher(xb)
            loss = distill_loss(student(xb), target, yb, temperature=t["temperature"], hard_weight=t["hard_label_weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        metrics = {"epoch": epoch, "distill_loss": total / n, "epoch_seconds": time.perf_counter() - t0}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                say(f"[distill] epoch {epoch + 1}/{t['epochs']}  loss {metrics['distill_loss']:.4f}  "
                    f"({metrics['epoch_seconds']:.0f} s)")
                mlflow.MlflowClient(cfg["tracking_uri"]).log_metric(cfg["run_id"], "distill_loss",
                                                                     metrics["distill_loss"], step=epoch)
                model = student.module if hasattr(student, "module") else student
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                           Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def ms_per_image(model: torch.nn.Module, x: torch.Tensor, *, repeats: int = 5) -> float:
    """Best-of-``repeats`` inference latency per image on a batch (the serving cost)."""
    model.eval()
    with torch.no_grad():
        model(x)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return 1000 * best / len(x)


def measure(model, x, y, group) -> dict:
    from equiray.metrics import invariance, orbit_logits

    return invariance(orbit_logits(model, x, group, batch_size=256), y)


def run(cfg: DistillConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Distil, measure, register. With ``reuse``, a student registered by this very config (and teacher
    version) is reported instead of trained again."""
    import mlflow
    import ray.data

    from equiray.data import read_split, split_files
    from equiray.groups import get_group
    from equiray.models import create_model
    from pipelines import _tracking
    from pipelines._ray import init_ray

    cfg.data.prepare()
    data_dir = str(Path(cfg.data.dir).resolve())
    uri = _tracking.tracking_uri()
    _tracking.setup(cfg.tracking.experiment, uri)
    teacher, spec = _tracking.load_model(cfg.teacher)  # fails early and clearly when nothing is registered
    group_name = cfg.group or spec.get("group") or "C4"
    group = get_group(group_name)
    cfg_hash = _tracking.config_hash({"config": to_dict(cfg), "teacher": _tracking.registry_version(cfg.teacher)})
    if reuse:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias, config_hash_value=cfg_hash)
        if mv is not None:
            metrics = mlflow.MlflowClient().get_run(mv.run_id).data.metrics
            rows = {who: {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(key + "/")}
                    for who, key in (("ensemble (teacher)", "teacher"), ("student", "student"))}
            return {"run_id": mv.run_id, "tracking_uri": uri, "rows": rows, "table": distill_table(rows, group_name),
                    "version": str(mv.version), "reused": True, "train_seconds": metrics.get("train_seconds"),
                    "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}",
                    "speedup": rows["ensemble (teacher)"]["ms_per_image"] / rows["student"]["ms_per_image"]}
    init_ray()
    train_ds = ray.data.read_parquet(split_files(data_dir, "train"))
    if cfg.data.max_train:
        train_ds = train_ds.limit(cfg.data.max_train)
    run_name = cfg.tracking.run_name or f"distill-{cfg.student.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    with mlflow.start_run(run_name=run_name) as active:
        run_id = active.info.run_id
        _tracking.log_config(cfg)
        mlflow.set_tags({"equiray.pipeline": "distill", "equiray.teacher": cfg.teacher})
        loop_cfg = {**to_dict(cfg), "group": group_name, "run_id": run_id, "tracking_uri": uri}
        result = fit(train_loop_per_worker, loop_cfg, scaling=cfg.scaling, run_name=run_name,
                     storage_path=cfg.storage_path, datasets={"train": train_ds})
        student = create_model(cfg.student.name, in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                               **cfg.student.kwargs)
        with result.checkpoint.as_directory() as d:
            student.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["model"])
        train_seconds = time.perf_counter() - t0
        size = spec["input_shape"][-1]
        x, y = read_split(data_dir, "test", limit=cfg.max_eval)
        x = resize(x, size)
        rows = {"ensemble (teacher)": measure(teacher, x, y, group), "student": measure(student.eval(), x, y, group)}
        batch = x[:256]
        rows["ensemble (teacher)"]["ms_per_image"] = ms_per_image(teacher, batch)
        rows["student"]["ms_per_image"] = ms_per_image(student, batch)
        for who, m in rows.items():
            key = "student" if who == "student" else "teacher"
            mlflow.log_metrics({f"{key}/{k}": float(v) for k, v in m.items()})
        mlflow.log_metric("train_seconds", train_seconds)
        table = distill_table(rows, group_name)
        mlflow.log_text(table, "distill_table.md")
        student_spec = {"name": cfg.student.name, "in_chans": spec["in_chans"], "num_classes": spec["num_classes"],
                        "kwargs": dict(cfg.student.kwargs), "input_shape": spec["input_shape"],
                        "classes": spec.get("classes"), "group": group_name, "teacher": cfg.teacher}
        model_uri = _tracking.log_model(student, student_spec, name="student")
        version = _tracking.register(model_uri, cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"run_id": run_id, "test_accuracy": f"{rows['student']['accuracy']:.4f}",
                                           "equiray.config_hash": cfg_hash})
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "distill_table.md").write_text(table + "\n")
    return {"run_id": run_id, "tracking_uri": uri, "rows": rows, "table": table, "version": version,
            "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}", "model_uri": model_uri,
            "train_seconds": train_seconds, "reused": False, "speedup": rows["ensemble (teacher)"]["ms_per_image"] /
            rows["student"]["ms_per_image"]}


def distill_table(rows: dict, group: str) -> str:
    lines = [f"| model | accuracy | {group}-orbit accuracy | OSP (max {next(iter(rows.values()))['orbit_size']}) "
             "| sym. KL | ms / image |", "|---|---|---|---|---|---|"]
    for who, m in rows.items():
        lines.append(f"| {who} | {m['accuracy'] * 100:.1f}% | {m['orbit_accuracy'] * 100:.1f}% | {m['osp']:.3f} | "
                     f"{m['kl']:.4f} | {m['ms_per_image']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("distill", argv)


if __name__ == "__main__":
    raise SystemExit(main())
