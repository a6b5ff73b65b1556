"""What runs on a Ray Train worker: this worker's member groups, round by round, checkpointed after each round.

Group ``i`` belongs to worker ``i % num_workers``. A round trains one epoch of this worker's first unfinished
group (:class:`equiray.ensembles.MemberGroup`: loaded from its file, or built from its members' seeds, trained,
saved back). Every so many rounds (as many as the worker has groups, or ``checkpoint_every``) and after the last,
all its group files go into one Ray Train checkpoint: a run checkpoints ``epochs`` times, so checkpoint bytes grow
with the members, not with the square of a worker's groups. A restarted worker group copies the latest
checkpoint's files back and goes on from the round after it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.ensembles import MemberGroup, MemberSpec, member_seed
from equiray.groups import Group, get_group
from equiray.train import EpochStats
from equiray_pipelines._common import load_shard, worker_threads
from equiray_pipelines._ray import say
from equiray_pipelines.progress import Progress
from equiray_pipelines.ensemble.config import EnsembleConfig, GroupPlan


@dataclass(frozen=True)
class WorkerRun:
    """The run-time values every worker needs beside the config."""

    run_id: str  # the MLflow run rank 0 logs per-group losses to
    tracking_uri: str
    num_classes: int
    groups: tuple[GroupPlan, ...]
    rounds: int  # the most groups any worker has, times epochs
    specs: tuple[MemberSpec, ...] = ()  # what a member of each setting is
    pretrained: dict | None = None  # the state dict every member starts from (member.init_from), or None


def group_file(gid: int) -> str:
    """A member group's file name, in a worker's folder and in the checkpoint."""
    return f"group-{gid:05d}.pt"


def train_group_epoch(cfg: EnsembleConfig, run: WorkerRun, plan: GroupPlan, path: Path, x: torch.Tensor,
                      y: torch.Tensor, *, group: Group, device: torch.device, node: str) -> tuple[int, EpochStats]:
    """Load the group saved in ``path`` (or build it from its members' seeds), train it one epoch on ``node``,
    save it back; returns ``(epochs done, the epoch's stats)``."""
    setting = cfg.settings[plan.setting]
    if path.is_file():
        grp = MemberGroup.load(path, device=device)
    else:
        spec = run.specs[plan.setting]
        pretrained = None
        if run.pretrained is not None:  # strong members: copies of the registered model
            pretrained = spec.build()
            pretrained.load_state_dict(run.pretrained)
        grp = MemberGroup.new(spec, [member_seed(cfg.train.seed, m) for m in plan.members],
                              init="pretrained" if pretrained is not None else setting.init, group=cfg.group,
                              optimizer=cfg.train.optimizer, lr=cfg.train.lr, device=device, pretrained=pretrained)
    stats = grp.train_epoch(x, y, batch_size=cfg.train.batch_size, group=group if setting.augment else None,
                            device=device, node=node, rotations=setting.rotations)
    grp.save(path)
    return grp.epochs_done, stats


def _device(cfg: EnsembleConfig) -> torch.device:
    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


PHASES = ("train", "group_io", "checkpoint")  # where a worker's time goes: its groups' epochs, their files, reports


def _restore(checkpoint, mine: list[GroupPlan], local: Path) -> tuple[int, int, dict[str, float]]:
    """Copy this worker's group files out of ``checkpoint`` into ``local``; returns ``(rounds completed, restarts
    so far, the seconds spent so far per phase)`` (zeros without a checkpoint)."""
    if not checkpoint:
        return 0, 0, dict.fromkeys(PHASES, 0.0)
    with checkpoint.as_directory() as d:
        for g in mine:
            src = Path(d) / group_file(g.gid)
            if src.is_file():
                shutil.copy(src, local / src.name)
        progress = Path(d) / "round.json"
        if progress.is_file():
            done = json.loads(progress.read_text())
            spent = done.get("seconds", {})
            return done["completed_rounds"], done["restarts"] + 1, {k: float(spent.get(k, 0.0)) for k in PHASES}
    return 0, 0, dict.fromkeys(PHASES, 0.0)


def _report(metrics: dict, local: Path, progress: dict | None, *, checkpoint: bool = True) -> None:
    """The round's metrics, and with ``checkpoint`` every group file of this worker (and, from rank 0, the
    round's progress) as one Ray Train checkpoint."""
    import ray.train

    if not checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as out:
        for f in local.glob("group-*.pt"):
            shutil.copy(f, Path(out) / f.name)
        if progress is not None:
            (Path(out) / "round.json").write_text(json.dumps(progress))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))


def train_loop_per_worker(config: dict) -> None:
    """Train this worker's member groups round by round; checkpoint all of them after every round.
    ``config`` is Ray Train's envelope: ``{"cfg": EnsembleConfig, "run": WorkerRun}``."""
    import ray
    import ray.train
    from mlflow import MlflowClient

    cfg: EnsembleConfig = config["cfg"]
    run: WorkerRun = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg.scaling.torch_threads)
    device = _device(cfg)
    x, y = load_shard(ray.train.get_dataset_shard("train"), size=cfg.data.resize, limit=cfg.data.max_train)
    x, y = x.to(device), y.to(device)
    group = get_group(cfg.group)
    mine = [g for g in run.groups if g.gid % world == rank]
    epochs = cfg.train.epochs

    local = Path(tempfile.mkdtemp(prefix=f"equiray-groups-{rank}-"))  # this worker's latest group states
    checkpoint = ray.train.get_checkpoint()
    start_round, restarts, seconds = _restore(checkpoint, mine, local)  # rank 0's seconds reach the driver
    done = {g.gid: MemberGroup.saved_epochs(local / group_file(g.gid)) if (local / group_file(g.gid)).is_file()
            else 0 for g in mine}
    if checkpoint:
        say(f"[ensemble] worker {rank}: resumed at round {start_round + 1} from the latest checkpoint "
            f"(epochs done per group: {done})")
    client = MlflowClient(run.tracking_uri) if rank == 0 else None
    node = ray.get_runtime_context().get_node_id()  # a restarted worker group may land elsewhere
    bar = Progress(run.rounds - start_round, desc=f"worker {rank} rounds", unit="rounds", prefix="ensemble",
                   every_s=None)
    every = cfg.checkpoint_every or max(1, run.rounds // epochs)  # groups per worker; alike on every worker
    for r in range(start_round, run.rounds):
        metrics = {"round": r + 1}
        todo = [g for g in mine if done[g.gid] < epochs]
        if todo:
            g = todo[0]
            t = time.perf_counter()
            done[g.gid], stats = train_group_epoch(cfg, run, g, local / group_file(g.gid), x, y, device=device,
                                                   group=group, node=node)
            seconds["train"] += stats.seconds
            seconds["group_io"] += time.perf_counter() - t - stats.seconds
            metrics.update(loss=stats.loss, accuracy=stats.accuracy, member_samples=stats.samples)
            bar.update()
            say(f"[ensemble] worker {rank} round {r + 1}/{run.rounds}: group {g.gid} "
                f"({cfg.settings[g.setting].name}, {len(g.members)} members) epoch "
                f"{done[g.gid]}/{epochs}  loss {stats.loss:.4f}  acc {stats.accuracy:.4f}"
                + (f"  ({bar.left()})" if bar.left() else ""))
            if client is not None:
                client.log_metric(run.run_id, f"train_loss/group{g.gid:05d}", stats.loss, step=done[g.gid])
        else:
            bar.update()
        t = time.perf_counter()
        metrics.update({f"worker_{k}_seconds": v for k, v in seconds.items()})
        _report(metrics, local, {"completed_rounds": r + 1, "restarts": restarts, "seconds": seconds}
                if rank == 0 else None, checkpoint=(r + 1) % every == 0 or r + 1 == run.rounds)
        seconds["checkpoint"] += time.perf_counter() - t
    bar.close()
    shutil.rmtree(local, ignore_errors=True)
