"""What runs on each Ray Train worker: load the teacher, train the student on group-transformed inputs to match
the teacher's softened outputs (:class:`equiray.distill.Distillation` through :func:`equiray.train.train_epoch`),
report each epoch (rank 0 logs to MLflow and checkpoints)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.distill import Distillation
from equiray.groups import get_group
from equiray.models import create_model
from equiray.train import shuffled_batches, train_epoch
from equiray_pipelines._common import load_shard, resume_from_checkpoint, unwrap, worker_threads
from equiray_pipelines._ray import say
from equiray_pipelines.distill.config import DistillConfig, StudentConfig


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs beside the config, known only once the stage runs."""

    group: str  # the augmentation group (the config's, or the one the teacher was trained with)
    run_id: str  # the stage's MLflow run, where rank 0 logs the epochs
    tracking_uri: str


def build_student(student: StudentConfig, teacher_spec: dict) -> torch.nn.Module:
    """The student, for the teacher's inputs and classes."""
    return create_model(student.name, in_chans=teacher_spec["in_chans"], num_classes=teacher_spec["num_classes"],
                        **student.kwargs)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: ``config`` is ``{"cfg": DistillConfig, "args": WorkerArgs}``."""
    train(**config)


def train(cfg: DistillConfig, args: WorkerArgs) -> None:
    import mlflow
    import ray.train
    import ray.train.torch

    from equiray_pipelines import tracking

    worker_threads(cfg.scaling.torch_threads)
    rank = ray.train.get_context().get_world_rank()
    mlflow.set_tracking_uri(args.tracking_uri)
    device = ray.train.torch.get_device()
    teacher, spec = tracking.load_model(cfg.teacher, device=device)
    group = get_group(args.group)
    x, y = load_shard(ray.train.get_dataset_shard("train"), size=spec["input_shape"][-1], limit=cfg.data.max_train)
    t = cfg.train
    torch.manual_seed(t.seed + rank)
    student = ray.train.torch.prepare_model(build_student(cfg.student, spec))
    opt = torch.optim.Adam(student.parameters(), lr=t.lr)
    start = resume_from_checkpoint(student, device, optimizer=opt)
    gen = torch.Generator().manual_seed(t.seed * 31 + rank)
    turn = None
    if cfg.rotations != "none":  # the turns come from their own generator, seeded like the batches'
        from equiray.canon.train import RandomRotations

        rotations = RandomRotations(torch.Generator().manual_seed(t.seed * 37 + rank), mirror=cfg.rotations == "o2")
        turn = lambda batch: rotations(batch)[0]  # noqa: E731
    objective = Distillation(teacher, temperature=t.temperature, hard_weight=t.hard_label_weight, turn=turn)
    for epoch in range(start, t.epochs):
        stats = train_epoch(student, shuffled_batches(x, y, t.batch_size, generator=gen), opt, objective=objective,
                            device=device, augment=group if turn is None else None, generator=gen)
        metrics = {"epoch": epoch, "distill_loss": stats.loss, "epoch_seconds": stats.seconds}
        if rank == 0:
            say(f"[distill] epoch {epoch + 1}/{t.epochs}  loss {stats.loss:.4f}  ({stats.seconds:.0f} s)")
            mlflow.MlflowClient(args.tracking_uri).log_metric(args.run_id, "distill_loss", stats.loss, step=epoch)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": unwrap(student).state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                           Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
