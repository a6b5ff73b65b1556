"""What runs on each Ray Train worker: build the model, resume from a checkpoint if any, train epochs with
:func:`equiray.train.train_epoch`, evaluate on the validation shard, report each epoch (rank 0 logs to MLflow and
checkpoints)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.groups import get_group
from equiray.models import create_model
from equiray.train import shuffled_batches, train_epoch
from equiray_pipelines._common import (batches_from_shard, load_shard, resume_from_checkpoint, unwrap, worker_threads)
from equiray_pipelines._ray import say
from equiray_pipelines.progress import Progress
from equiray_pipelines.pretrain.config import ModelConfig, PretrainConfig


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs beside the config, known only once the stage runs."""

    in_chans: int
    num_classes: int
    run_id: str  # the stage's MLflow run, where rank 0 logs the epochs
    train_rows: int  # rows of the training set in all (for the progress lines)
    tracking_uri: str


def build_model(model: ModelConfig, *, in_chans: int, num_classes: int) -> torch.nn.Module:
    return create_model(model.name, in_chans=in_chans, num_classes=num_classes, pretrained=model.pretrained,
                        **model.kwargs)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: ``config`` is ``{"cfg": PretrainConfig, "args": WorkerArgs}``."""
    train(**config)


def train(cfg: PretrainConfig, args: WorkerArgs) -> None:
    import ray.train
    import ray.train.torch
    from mlflow import MlflowClient

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg.scaling.torch_threads)
    t = cfg.train
    torch.manual_seed(t.seed + rank)
    device = ray.train.torch.get_device()
    net = build_model(cfg.model, in_chans=args.in_chans, num_classes=args.num_classes)
    if device.type == "cpu":  # oneDNN's convolutions run faster on channels-last weights (equiray.train.fast_layout)
        net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    start_epoch = resume_from_checkpoint(model, device, optimizer=opt, scheduler=sched)
    client = MlflowClient(args.tracking_uri) if rank == 0 else None
    augment = get_group(t.augment) if t.augment else None
    gen = torch.Generator().manual_seed(t.seed * 7919 + rank)
    cache = load_shard(ray.train.get_dataset_shard("train")) if cfg.data.in_memory else None
    # the validation shard too: streaming it anew every epoch cost ~5 s of Ray Data start-up per epoch
    val = load_shard(ray.train.get_dataset_shard("val")) if cfg.data.in_memory else None
    per_epoch = -(-args.train_rows // (t.batch_size * world))
    bar = Progress(per_epoch * (t.epochs - start_epoch), desc="training", unit="batches", prefix="pretrain",
                   mode=None if rank == 0 else "off")
    for epoch in range(start_epoch, t.epochs):
        batches = bar.wrap(_epoch_batches(cache, ray.train.get_dataset_shard("train"), cfg, gen))
        stats = train_epoch(model, batches, opt, device=device, augment=augment, generator=gen)
        correct, count = _evaluate(model, _val_batches(val, ray.train.get_dataset_shard("val"), 512), device)
        sched.step()
        metrics = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "val_accuracy": correct / max(count, 1), "epoch_seconds": stats.seconds,
                   "samples_per_second": stats.samples * world / stats.seconds, "lr": sched.get_last_lr()[0]}
        if rank == 0:
            say(f"[pretrain] epoch {epoch + 1}/{t.epochs}  loss {stats.loss:.4f}  train acc {stats.accuracy:.4f}"
                f"  val acc {metrics['val_accuracy']:.4f}  ({stats.seconds:.0f} s, "
                f"{metrics['samples_per_second']:.0f} samples/s)")
            for k, v in metrics.items():
                if k != "epoch":
                    client.log_metric(args.run_id, k, float(v), step=epoch)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch}, Path(d) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    bar.close()


def _epoch_batches(cache, shard, cfg: PretrainConfig, gen: torch.Generator):
    """This epoch's training batches: from the in-memory copy of the shard (reshuffled), or streamed."""
    if cache is None:
        return batches_from_shard(shard, cfg.train.batch_size, cfg.train.shuffle_buffer)
    x, y = cache
    return shuffled_batches(x, y, cfg.train.batch_size, generator=gen)


def _val_batches(cache, shard, batch_size: int):
    """The validation batches: from the in-memory copy of the shard, or streamed."""
    if cache is None:
        return batches_from_shard(shard, batch_size, None)
    x, y = cache
    return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))


def _evaluate(model, batches, device) -> tuple[float, float]:
    """(correct, count) over this worker's validation ``batches``, summed over workers when distributed."""
    import torch.distributed as dist

    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in batches:
            pred = model(x.to(device)).argmax(-1)
            correct[0] += (pred == y.to(device)).sum()
            correct[1] += len(y)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
    return float(correct[0]), float(correct[1])
