"""One Ray Tune trial: fine-tune the backbone with the trial's method and knobs, evaluate ID and OOD every epoch,
log to the trial's own MLflow run (nested under the search's) and checkpoint every epoch for ``--resume``.

Why trials train in the Tune function rather than in a ``TorchTrainer`` per trial: when ASHA stops a trial that
runs a Train V2 ``TorchTrainer``, its worker group is not released (Ray issue 54305) and the next trial waits
forever on a small machine. A trial is a single-process job with its own CPU / GPU-fraction resources.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from equiray.optim import RobustFineTuner, fits_on_holdout, method_knobs
from equiray_pipelines.ftp.config import FTPConfig, method_params
from equiray_pipelines.ftp.task import Task, build_model, evaluate


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a search shares: the config, the task (a Ray object reference to a :class:`Task`),
    the backbone (its ``create_model`` spec and CPU state dict) and where the search's MLflow run is."""

    cfg: FTPConfig
    task: Any  # ray.ObjectRef[Task]
    spec: dict
    state: dict
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def metric_key(view: str) -> str:
    """A view name as a metric key (MLflow and TensorBoard refuse ':')."""
    return view.replace(":", "_")


def _trial(config: dict, *, ctx: TrialContext) -> None:
    """The Tune function: ``config`` is the searcher's point (``method``, ``lr``, ``weight_decay`` and every
    method's knobs; the method reads its own). Its name is the Tune trainable's: trial directories carry it and
    ``Tuner.restore`` (``--resume``) refuses a trainable of another name than the interrupted search's."""
    import mlflow
    import ray
    import ray.tune

    for noisy in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" once per epoch and trial
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = ctx.cfg
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    task: Task = ray.get(ctx.task)
    model = build_model(ctx.spec, ctx.state, new_head=cfg.task.new_head, seed=cfg.search.seed).to(device)
    method = config["method"]
    tuner, (x, y) = fine_tuner(cfg, model, config, task.train)
    gen = torch.Generator().manual_seed(cfg.search.seed)
    mlflow.set_tracking_uri(ctx.tracking_uri)
    client = mlflow.MlflowClient()
    start_epoch, run_id = _restore(tuner, gen, device)
    # an interrupt between the MLflow log and Tune persisting the epoch's checkpoint leaves that epoch logged
    # but not checkpointed: it is trained again from the same state, and not logged a second time
    logged = set() if run_id is None else {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    if run_id is None:
        run_id = _start_run(client, ctx, config)
    else:  # restarted from its checkpoint (its node or worker lost, or the search resumed): the run says so
        restarts = int(client.get_run(run_id).data.tags.get("equiray.restarts", "0")) + 1
        client.set_tag(run_id, "equiray.restarts", str(restarts))
        client.set_tag(run_id, "equiray.restarted_at_epoch", str(start_epoch))
    client.set_tag(run_id, "equiray.node", ray.get_runtime_context().get_node_id())  # where it trains now
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        loss = tuner.epoch(x, y, generator=gen, device=device).loss
        metrics = _evaluate(model, task, cfg, epoch=epoch, loss=loss, seconds=time.perf_counter() - t0,
                            device=device)
        if epoch not in logged:
            _log(client, run_id, method, metrics, epochs=cfg.train.epochs)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "optimizer": tuner.optimizer.state_dict(),
                        "generator": gen.get_state(), "epoch": epoch, "run_id": run_id}, Path(d) / "trial.pt")
            ray.tune.report({**metrics, "run_id": run_id}, checkpoint=ray.tune.Checkpoint.from_directory(d))


def fine_tuner(cfg: FTPConfig, model: torch.nn.Module, config: dict,
               train: tuple[torch.Tensor, torch.Tensor]) -> tuple[RobustFineTuner, tuple[torch.Tensor, torch.Tensor]]:
    """The trial's fine-tuner for the point ``config`` (``method``, ``lr``, ``weight_decay``, the method's knobs)
    and the images it trains on: all of ``train``, less TPGM's held-out share, on which it fits its radii."""
    method = config["method"]
    x, y = train
    holdout = None
    if fits_on_holdout(method):
        h = cfg.task.tpgm_holdout
        holdout, x, y = (x[-h:], y[-h:]), x[:-h], y[:-h]
    tuner = RobustFineTuner(model, method, lr=config["lr"], weight_decay=config["weight_decay"],
                            batch_size=cfg.train.batch_size, holdout=holdout,
                            projection_interval=cfg.train.projection_interval, base=cfg.train.base,
                            **{k: config[k] for k in method_knobs(method)})
    return tuner, (x, y)


def _restore(tuner: RobustFineTuner, gen: torch.Generator, device: torch.device) -> tuple[int, str | None]:
    """A resumed or restarted trial: the same MLflow run, the same model / optimizer / generator state. Returns
    the epoch to start at and the trial's run id (``(0, None)`` for a fresh trial)."""
    import ray.tune

    ckpt = ray.tune.get_checkpoint()
    if not ckpt:
        return 0, None
    with ckpt.as_directory() as d:
        saved = torch.load(Path(d) / "trial.pt", map_location=device, weights_only=False)
    tuner.model.load_state_dict(saved["model"])
    tuner.optimizer.load_state_dict(saved["optimizer"])
    gen.set_state(saved["generator"])
    return saved["epoch"] + 1, saved["run_id"]


def _start_run(client, ctx: TrialContext, config: dict) -> str:
    """The trial's MLflow run, nested under the search's, with the values its method uses as params."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{config['method']} lr={config['lr']:.1e} #{trial_id}"
    run = client.create_run(ctx.experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": ctx.parent_run_id, "equiray.pipeline": "ftp",
                                  "equiray.method": config["method"], "equiray.trial_id": trial_id})
    for k, v in method_params(config).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def _evaluate(model: torch.nn.Module, task: Task, cfg: FTPConfig, *, epoch: int, loss: float, seconds: float,
              device: torch.device) -> dict[str, float]:
    """The epoch's metrics: training loss, ID validation (what trials are selected on), ID test and OOD."""
    val = evaluate(model, {"id_val": task.val[0]}, task.val[1], device=device)["id_val"]
    test = evaluate(model, task.test_views(), task.labels, device=device)
    ood = {f"ood/{metric_key(k)}": v for k, v in test.items() if k != "id_test"}
    return {"epoch": epoch, "train_loss": loss, "val_accuracy": val, "id_test_accuracy": test["id_test"],
            "ood_mean_accuracy": sum(ood.values()) / len(ood), "epoch_seconds": seconds, **ood}


def _log(client, run_id: str, method: str, metrics: dict[str, float], *, epochs: int) -> None:
    from equiray_pipelines._ray import say

    epoch = metrics["epoch"]
    for k, v in metrics.items():
        if k != "epoch":
            client.log_metric(run_id, k, float(v), step=epoch)
    say(f"[ftp] {method:8s} epoch {epoch + 1}/{epochs}  loss {metrics['train_loss']:.3f}  ID val "
        f"{metrics['val_accuracy']:.3f}  OOD mean {metrics['ood_mean_accuracy']:.3f}  "
        f"({metrics['epoch_seconds']:.1f} s)")
    if epoch == epochs - 1:  # before the last report: a scheduler may end the trial right at it
        client.set_terminated(run_id, "FINISHED")
