"""Robust fine-tuning on Ray Tune: FTP, TPGM, L2-SP and plain fine-tuning searched over their constraints.

The transfer task: the pretrained backbone (``equiray-backbone@pretrained``, trained on clean upright images) is
fine-tuned on a small labelled *target* set drawn from a shifted domain (``task.target_view``, by default
low-contrast images, on which the backbone is poor), with a new classifier head. In-distribution (ID) is the
target domain; out-of-distribution (OOD) are the domains the backbone was good at and fine-tuning can forget
(``task.ood_views``: clean, noisy, blurred, pixelated, occluded test images).

``equiray tune ftp --config FILE`` runs one Ray Tune experiment: the method and its knobs (lr, weight decay;
FTP's k, radius learning rate and initial radius; L2-SP's alpha/beta; TPGM's radius learning rate) come from a
searcher (Optuna's TPE when installed, random search otherwise; every method's defaults are tried first), an
ASHA scheduler stops weak trials early, and trials are *selected on ID validation accuracy only*: ID test and
OOD accuracies are measured every epoch and reported, never selected on. Every trial is an MLflow run (nested
under the search's run) with its config and curves; every epoch is a Tune checkpoint, so ``--resume`` continues
an interrupted search without re-running finished trials. The best trial's model is registered as
``equiray-ftp@champion``.

Why trials train in the Tune function rather than in a ``TorchTrainer`` per trial: when ASHA stops a trial that
runs a Train V2 ``TorchTrainer``, its worker group is not released (Ray issue 54305) and the next trial waits
forever on a small machine. A trial is a single-process job with its own CPU / GPU-fraction resources.

    python -m pipelines.ftp --config configs/ftp.yaml [--resume]
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from equiray.config import to_dict
from equiray.data.views import apply_view, parse_view
from equiray.errors import ConfigError, EquirayError
from equiray.optim import METHODS, TPGM, make_optimizer
from pipelines._common import DataConfig, ResourcesConfig, TrackingConfig

log = logging.getLogger(__name__)

METHOD_ORDER = ("finetune", "l2sp", "ftp", "tpgm")


@dataclass(frozen=True)
class TaskConfig:
    target_view: str = "contrast:3"  # the ID domain: this view of the source images
    train_images: int = 2000  # the small labelled target set (TPGM holds out `tpgm_holdout` of it)
    val_images: int = 1000  # ID validation (from the val split): the only thing trials are selected on
    test_images: int = 2000
    ood_views: tuple[str, ...] = ("upright", "noise:3", "blur:3", "pixelate:3", "occlude:3")
    new_head: bool = True  # a freshly initialized classifier (excluded from the constraints)
    tpgm_holdout: int = 200

    def __post_init__(self):
        for v in (self.target_view, *self.ood_views):
            try:
                parse_view(v)
            except (ValueError, EquirayError) as exc:
                raise ConfigError(f"task: {exc}") from None
        if min(self.train_images, self.val_images, self.test_images) < 1 or not self.ood_views:
            raise ConfigError("task: train/val/test_images >= 1 and at least one OOD view")
        if not 0 < self.tpgm_holdout < self.train_images:
            raise ConfigError("task.tpgm_holdout: between 1 and train_images - 1")


@dataclass(frozen=True)
class SpaceConfig:
    """Search ranges ([low, high], sampled log-uniformly except k); each method reads only its own knobs."""

    methods: tuple[str, ...] = METHOD_ORDER
    lr: tuple[float, float] = (1e-4, 3e-3)
    weight_decay: tuple[float, float] = (1e-5, 1e-1)
    k: tuple[float, float] = (0.0, 1.0)  # FTP: positive-gradient annealing (uniform)
    mu: tuple[float, float] = (1e-2, 1.0)  # FTP: radius learning rate (a radius grows ~mu per step)
    gamma_init: tuple[float, float] = (1e-8, 1e-4)  # FTP: initial radius
    alpha: tuple[float, float] = (1e-4, 1.0)  # L2-SP: pull to the pretrained weights
    beta: tuple[float, float] = (1e-5, 1e-2)  # L2-SP: on the new head
    radius_lr: tuple[float, float] = (1e-3, 1e-1)  # TPGM: radius learning rate on the held-out batch

    def __post_init__(self):
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ConfigError(f"space.methods: unknown {sorted(unknown)}; choose from {list(METHOD_ORDER)}")
        for name in ("lr", "weight_decay", "k", "mu", "gamma_init", "alpha", "beta", "radius_lr"):
            lo, hi = getattr(self, name)
            if not lo <= hi or (name != "k" and lo <= 0):
                raise ConfigError(f"space.{name}: need 0 < low <= high, got [{lo}, {hi}]")

    def defaults(self, method: str) -> dict:
        """The first point tried for a method: the geometric middle of each range."""
        mid = {n: math.sqrt(a * b) for n, (a, b) in self._ranges().items() if n != "k"}
        return {"method": method, **mid, "k": sum(self.k) / 2}

    def _ranges(self) -> dict:
        return {n: getattr(self, n) for n in ("lr", "weight_decay", "k", "mu", "gamma_init", "alpha", "beta",
                                               "radius_lr")}

    def tune_space(self) -> dict:
        from ray import tune

        space = {"method": tune.choice(list(self.methods)), "k": tune.uniform(*self.k)}
        for n, (lo, hi) in self._ranges().items():
            if n != "k":
                space[n] = tune.loguniform(lo, hi) if hi > lo else lo
        return space


@dataclass(frozen=True)
class SearchConfig:
    num_samples: int = 12
    searcher: str = "optuna"  # optuna (TPE; random search if optuna is not installed) | random
    scheduler: str = "asha"  # asha | none
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it (constrained methods start slower)
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many as the resources allow
    seed: int = 0

    def __post_init__(self):
        if self.searcher not in ("optuna", "random") or self.scheduler not in ("asha", "none"):
            raise ConfigError("search: searcher is optuna|random, scheduler is asha|none")
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("search: num_samples >= 1, grace_period >= 1, reduction_factor >= 2")


@dataclass(frozen=True)
class FTPTrain:
    epochs: int = 6
    batch_size: int = 64
    base: str = "adamw"  # adamw | sgd (the optimizer every method wraps)
    projection_interval: int = 10  # TPGM: fit the radii on a held-out batch every this many steps

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.projection_interval < 1:
            raise ConfigError("train: epochs, batch_size, projection_interval >= 1")
        if self.base not in ("adamw", "sgd"):
            raise ConfigError("train.base: adamw or sgd")


@dataclass(frozen=True)
class FTPConfig:
    backbone: str = "models:/equiray-backbone@pretrained"
    data: DataConfig = DataConfig()
    task: TaskConfig = TaskConfig()
    space: SpaceConfig = SpaceConfig()
    search: SearchConfig = SearchConfig()
    train: FTPTrain = FTPTrain()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig("equiray-ftp", None, "equiray-ftp", "champion")
    storage_path: str = "runs"
    name: str | None = None  # the Tune experiment's name under storage_path (default: ftp-<config hash>)
    resume: bool = False  # continue the experiment of this name (`--resume`)


# ----------------------------------------------------------------------------------------- data and model
def load_task(cfg: FTPConfig) -> dict:
    """Target (ID) train/val/test tensors and the OOD test views, all from the prepared dataset."""
    from equiray.data import read_split

    cfg.data.prepare()
    t = cfg.task
    x, y = read_split(cfg.data.dir, "train", limit=t.train_images)
    xv, yv = read_split(cfg.data.dir, "val", limit=t.val_images)
    xt, yt = read_split(cfg.data.dir, "test", limit=t.test_images)
    target = {"train": (apply_view(x, t.target_view, seed=1), y), "val": (apply_view(xv, t.target_view, seed=2), yv),
              "test": (apply_view(xt, t.target_view, seed=3), yt)}
    ood = {v: apply_view(xt, v, seed=3) for v in t.ood_views}
    return {"target": target, "ood": ood, "labels": yt}


def build_model(spec: dict, state: dict, *, new_head: bool, seed: int) -> torch.nn.Module:
    from equiray.models import create_model

    model = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                         **spec.get("kwargs", {}))
    model.load_state_dict(state)
    if new_head:
        torch.manual_seed(seed)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if head is None or not any(True for _ in head.parameters()):
            raise ConfigError(f"task.new_head: cannot find the classifier of {spec['name']} (timm's get_classifier)")
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, views: dict[str, torch.Tensor], labels: torch.Tensor, *,
             batch_size: int = 512, device="cpu") -> dict[str, float]:
    """Accuracy on each (already transformed) view of the same labelled images."""
    from equiray.train import accuracy, predict

    return {name: accuracy(predict(model, x, batch_size=batch_size, device=device), labels)
            for name, x in views.items()}


def train_epoch(model, opt, x, y, *, batch_size: int, gen: torch.Generator, device, holdout=None,
                projection_interval: int = 10) -> float:
    """One epoch of ``task loss + opt.regularizer(model)``; TPGM also fits its radii on a held-out batch every
    ``projection_interval`` steps (its extra forward/backward passes)."""
    model.train()
    total, n = 0.0, 0
    for step, idx in enumerate(torch.randperm(len(y), generator=gen).split(batch_size)):
        xb, yb = x[idx].to(device), y[idx].to(device)
        loss = F.cross_entropy(model(xb), yb)
        reg = opt.regularizer(model)
        opt.zero_grad(set_to_none=True)
        (loss + reg).backward()
        opt.step()
        if isinstance(opt, TPGM) and holdout is not None and (step + 1) % projection_interval == 0:
            hx, hy = holdout
            pick = torch.randint(len(hy), (min(batch_size, len(hy)),), generator=gen)
            opt.project(model, (hx[pick].to(device), hy[pick].to(device)), F.cross_entropy)
        total += float(loss.detach()) * len(yb)
        n += len(yb)
    return total / max(n, 1)


def _knobs(config: dict, base: str, projection_interval: int) -> dict:
    m = config["method"]
    if m == "ftp":
        return {"base": base, "k": config["k"], "mu": config["mu"], "gamma_init": config["gamma_init"]}
    if m == "l2sp":
        return {"base": base, "alpha": config["alpha"], "beta": config["beta"]}
    if m == "tpgm":
        return {"base": base, "radius_lr": config["radius_lr"]}
    return {"base": base}


def _key(view: str) -> str:
    """A view name as a metric key (MLflow and TensorBoard refuse ':')."""
    return view.replace(":", "_")


def method_params(config: dict) -> dict:
    """The knobs a trial's method actually uses (what its MLflow run records)."""
    keep = {"finetune": (), "ftp": ("k", "mu", "gamma_init"), "l2sp": ("alpha", "beta"), "tpgm": ("radius_lr",)}
    return {"method": config["method"], "lr": config["lr"], "weight_decay": config["weight_decay"],
            **{k: config[k] for k in keep[config["method"]]}}


# ----------------------------------------------------------------------------------------- the Tune trial
def _trial(config: dict, *, shared: dict) -> None:
    import mlflow
    import ray
    import ray.tune

    from pipelines._ray import say

    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    for noisy in ("ray.train", "ray.tune"):  # "Checkpoint successfully created" once per epoch and trial
        logging.getLogger(noisy).setLevel(logging.WARNING)
    c = shared["cfg"]
    torch.set_num_threads(max(1, int(c["resources"]["cpus_per_trial"])))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    task = ray.get(shared["task"])
    spec, state = shared["backbone"]
    t, tk = c["train"], c["task"]
    seed = c["search"]["seed"]
    model = build_model(spec, state, new_head=tk["new_head"], seed=seed).to(device)
    x, y = task["target"]["train"]
    holdout = None
    if config["method"] == "tpgm":  # TPGM fits its radii on data it does not train on
        holdout = (x[-tk["tpgm_holdout"]:], y[-tk["tpgm_holdout"]:])
        x, y = x[:-tk["tpgm_holdout"]], y[:-tk["tpgm_holdout"]]
    opt = make_optimizer(config["method"], model, lr=config["lr"], weight_decay=config["weight_decay"],
                         **_knobs(config, t["base"], t["projection_interval"]))
    gen = torch.Generator().manual_seed(seed)
    mlflow.set_tracking_uri(shared["tracking_uri"])
    client = mlflow.MlflowClient()
    start_epoch, run_id = 0, None
    ckpt = ray.tune.get_checkpoint()
    if ckpt:  # a resumed or restarted trial: same MLflow run, same model/optimizer/generator state
        with ckpt.as_directory() as d:
            saved = torch.load(Path(d) / "trial.pt", map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        start_epoch, run_id = saved["epoch"] + 1, saved["run_id"]
    if run_id is None:
        name = f"{config['method']} lr={config['lr']:.1e} #{ray.tune.get_context().get_trial_id()}"
        run = client.create_run(shared["experiment_id"], run_name=name,
                                tags={"mlflow.parentRunId": shared["parent_run_id"], "equiray.pipeline": "ftp",
                                      "equiray.method": config["method"],
                                      "equiray.trial_id": ray.tune.get_context().get_trial_id()})
        run_id = run.info.run_id
        for k, v in method_params(config).items():
            client.log_param(run_id, k, v)
    views = {"id_val": task["target"]["val"][0]}
    for epoch in range(start_epoch, t["epochs"]):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, x, y, batch_size=t["batch_size"], gen=gen, device=device, holdout=holdout,
                           projection_interval=t["projection_interval"])
        seconds = time.perf_counter() - t0
        val = evaluate(model, views, task["target"]["val"][1], device=device)["id_val"]
        test = evaluate(model, {"id_test": task["target"]["test"][0], **task["ood"]}, task["labels"], device=device)
        ood = {f"ood/{_key(k)}": v for k, v in test.items() if k != "id_test"}
        metrics = {"epoch": epoch, "train_loss": loss, "val_accuracy": val, "id_test_accuracy": test["id_test"],
                   "ood_mean_accuracy": sum(ood.values()) / len(ood), "epoch_seconds": seconds, **ood}
        for k, v in metrics.items():
            if k != "epoch":
                client.log_metric(run_id, k, float(v), step=epoch)
        say(f"[ftp] {config['method']:8s} epoch {epoch + 1}/{t['epochs']}  loss {loss:.3f}  ID val {val:.3f}  "
            f"OOD mean {metrics['ood_mean_accuracy']:.3f}  ({seconds:.1f} s)")
        if epoch == t["epochs"] - 1:  # before the last report: a scheduler may end the trial right at it
            client.set_terminated(run_id, "FINISHED")
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "epoch": epoch, "run_id": run_id}, Path(d) / "trial.pt")
            ray.tune.report({**metrics, "run_id": run_id}, checkpoint=ray.tune.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------------------------- driver
def _searcher(cfg: FTPConfig):
    from ray.tune.search import BasicVariantGenerator

    points = [cfg.space.defaults(m) for m in cfg.space.methods][:cfg.search.num_samples]
    if cfg.search.searcher == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            log.warning("optuna is not installed (pip install optuna): random search instead")
        else:
            import optuna.samplers

            return OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=cfg.search.seed)), \
                "optuna TPE"
    return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.search.seed,
                                 max_concurrent=cfg.resources.max_concurrent), "random"


def run_tune(cfg: FTPConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Run (or ``cfg.resume`` an interrupted) search; tabulate, plot and register the champion."""
    import mlflow
    import ray
    from ray import tune

    from pipelines import _tracking
    from pipelines._ray import cluster_summary, init_ray

    t0 = time.perf_counter()
    uri = _tracking.tracking_uri()
    experiment_id = _tracking.setup(cfg.tracking.experiment, uri)
    backbone, spec = _tracking.load_model(cfg.backbone)
    cfg_hash = _tracking.config_hash({"config": {**to_dict(cfg), "resume": False},
                                      "backbone": _tracking.registry_version(cfg.backbone)})
    if reuse and not cfg.resume:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias, config_hash_value=cfg_hash)
        if mv is not None:
            log.info("reusing %s@%s (version %s): made by this same config", cfg.tracking.registered_model,
                     cfg.tracking.alias, mv.version)
            return _result_from_registry(cfg, mv, uri, report_dir)
    name = cfg.name or f"ftp-{cfg_hash}"
    exp_dir = Path(cfg.storage_path).resolve() / name
    state_file = exp_dir / "equiray.json"
    if cfg.resume:
        if not tune.Tuner.can_restore(str(exp_dir)) or not state_file.exists():
            raise EquirayError(f"nothing to resume at {exp_dir}: run without --resume first (or --set name=...)")
    elif exp_dir.exists():
        raise EquirayError(f"a search named {name!r} already exists at {exp_dir}; pass --resume to continue it, "
                           f"or --set name=ANOTHER to start a new one")
    task = load_task(cfg)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # one note per epoch
    init_ray()
    log.info("Ray: %s", cluster_summary())
    parent_id = json.loads(state_file.read_text())["parent_run_id"] if cfg.resume else None
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else name) as parent:
        if not parent_id:
            _tracking.log_config(cfg)
            mlflow.set_tags({"equiray.pipeline": "ftp", "equiray.backbone": cfg.backbone})
            exp_dir.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps({"parent_run_id": parent.info.run_id}))
        shared = {"cfg": to_dict(cfg), "task": ray.put(task),
                  "backbone": (spec, {k: v.cpu() for k, v in backbone.state_dict().items()}),
                  "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id}
        resources = {"cpu": cfg.resources.cpus_per_trial}
        if cfg.resources.gpus_per_trial:
            resources["gpu"] = cfg.resources.gpus_per_trial
        trainable = tune.with_resources(tune.with_parameters(_trial, shared=shared), resources)
        if cfg.resume:
            log.info("resuming %s: finished trials are kept, unfinished ones continue from their checkpoints", exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            searcher_name = "restored"
        else:
            searcher, searcher_name = _searcher(cfg)
            scheduler = None
            if cfg.search.scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                          grace_period=min(cfg.search.grace_period, cfg.train.epochs),
                                          reduction_factor=cfg.search.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=cfg.space.tune_space(),
                tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", search_alg=searcher,
                                            scheduler=scheduler, num_samples=cfg.search.num_samples,
                                            max_concurrent_trials=cfg.resources.max_concurrent or None),
                run_config=tune.RunConfig(name=name, storage_path=str(exp_dir.parent), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=1),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        log.info("search %s: %d trials, %s, %s scheduler", name, cfg.search.num_samples, searcher_name,
                 cfg.search.scheduler)
        grid = _fit_noting_interrupts(tuner)
        if grid is None or len(grid) < cfg.search.num_samples:
            raise EquirayError(f"the search was interrupted; its state is saved in {exp_dir}: continue it with the "
                               "same command plus --resume (finished trials are not re-run)")
        errors = [r.error for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} trials failed; first: {errors[0]}")
        pretrained = evaluate(build_model(spec, backbone.state_dict(), new_head=False, seed=0),
                              {"id_test": task["target"]["test"][0], **task["ood"]}, task["labels"])
        rows = _rows(grid, cfg)
        best_res = grid.get_best_result(metric="val_accuracy", mode="max", scope="last")
        best = next(r for r in rows if r["run_id"] == best_res.metrics["run_id"])
        table = results_table(rows, pretrained, cfg)
        plot = _plot(rows, pretrained, Path(report_dir) if report_dir else None)
        mlflow.log_artifact(str(plot), "plots")
        mlflow.log_text(table, "methods.md")
        mlflow.log_text(json.dumps({"rows": rows, "pretrained": pretrained}, indent=2), "trials.json")
        mlflow.log_metrics({"trials": len(rows), "search_seconds": time.perf_counter() - t0,
                            "champion_val_accuracy": best["val_accuracy"]})
        model_uri = _log_champion(best_res, best, spec, cfg)
        client = mlflow.MlflowClient()
        for r in rows:  # trials ASHA stopped early never reached their own end
            if r["epochs"] < cfg.train.epochs:
                client.set_tag(r["run_id"], "equiray.stopped_early", f"after epoch {r['epochs']} (ASHA)")
                client.set_terminated(r["run_id"], "KILLED")
        version = _tracking.register(model_uri, cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"method": best["method"], "run_id": best["run_id"],
                                           "val_accuracy": f"{best['val_accuracy']:.4f}",
                                           "equiray.config_hash": cfg_hash, "search_run_id": parent.info.run_id})
    return {"run_id": parent.info.run_id, "run_name": name, "experiment_dir": str(exp_dir), "tracking_uri": uri,
            "rows": rows, "pretrained": pretrained, "table": table, "verdict": verdict(rows, pretrained),
            "champion": best, "plot": str(plot), "version": version, "reused": False, "searcher": searcher_name,
            "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"}


def _fit_noting_interrupts(tuner):
    """``tuner.fit()``, or None when Ctrl+C (SIGINT) interrupted it. Tune catches the first SIGINT itself, marks the
    running trials TERMINATED like finished ones and returns normally; what tells the two apart is that its handler
    puts the previous SIGINT handler back only when it fired."""
    import signal
    import threading

    catches = threading.current_thread() is threading.main_thread() and os.getenv("TUNE_DISABLE_SIGINT_HANDLER",
                                                                                    "0") == "0"
    before = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        return None
    return None if catches and signal.getsignal(signal.SIGINT) is before else grid


def _rows(grid, cfg: FTPConfig) -> list[dict]:
    rows = []
    for r in grid:
        m = r.metrics
        if not m or "val_accuracy" not in m:
            continue
        hist = r.metrics_dataframe
        rows.append({**method_params(r.config), "run_id": m["run_id"], "epochs": int(m["epoch"]) + 1,
                     "val_accuracy": m["val_accuracy"], "id_test_accuracy": m["id_test_accuracy"],
                     "ood_mean_accuracy": m["ood_mean_accuracy"],
                     "ood": {v: m[f"ood/{_key(v)}"] for v in cfg.task.ood_views},
                     "epoch_seconds": float(hist["epoch_seconds"].mean()) if hist is not None and len(hist)
                     else m["epoch_seconds"]})
    rows.sort(key=lambda r: (METHOD_ORDER.index(r["method"]), -r["val_accuracy"]))
    return rows


def _log_champion(result, row: dict, spec: dict, cfg: FTPConfig) -> str:
    """Log the best trial's final weights (its latest checkpoint) as the model of its own MLflow run."""
    import mlflow

    from pipelines import _tracking

    model = build_model(spec, _state_of(result), new_head=False, seed=0)
    with mlflow.start_run(run_id=row["run_id"], nested=True):
        return _tracking.log_model(model, {**spec, "kwargs": dict(spec.get("kwargs", {})),
                                           "task": cfg.task.target_view})


def _state_of(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / "trial.pt", map_location="cpu", weights_only=False)["model"]


def results_table(rows: list[dict], pretrained: dict, cfg: FTPConfig) -> str:
    """Best trial per method (by ID validation accuracy), next to the pretrained backbone with no fine-tuning."""
    views = list(cfg.task.ood_views)
    head = (f"| method (best of its trials by ID val) | trials | ID val | ID test ({cfg.task.target_view}) | "
            + " | ".join(f"OOD {v}" for v in views) + " | OOD mean | s / epoch |")
    lines = [head, "|" + "---|" * (6 + len(views))]
    ood_mean = sum(pretrained[v] for v in views) / len(views)
    lines.append(f"| pretrained backbone, no fine-tuning | - | - | {pretrained['id_test'] * 100:.1f}% | "
                 + " | ".join(f"{pretrained[v] * 100:.1f}%" for v in views) + f" | {ood_mean * 100:.1f}% | - |")
    for method in METHOD_ORDER:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        b = max(mine, key=lambda r: r["val_accuracy"])
        lines.append(f"| {method} | {len(mine)} | {b['val_accuracy'] * 100:.1f}% | {b['id_test_accuracy'] * 100:.1f}% | "
                     + " | ".join(f"{b['ood'][v] * 100:.1f}%" for v in views)
                     + f" | {b['ood_mean_accuracy'] * 100:.1f}% | {b['epoch_seconds']:.1f} |")
    return "\n".join(lines)


def verdict(rows: list[dict], pretrained: dict) -> list[str]:
    best = {}
    for r in rows:
        if r["method"] not in best or r["val_accuracy"] > best[r["method"]]["val_accuracy"]:
            best[r["method"]] = r
    views = list(next(iter(rows))["ood"]) if rows else []
    out = []
    if "finetune" in best and views:
        pre = sum(pretrained[v] for v in views) / len(views)
        ft = best["finetune"]
        lost = pre - ft["ood_mean_accuracy"]
        out.append(f"- The pretrained backbone averages {pre * 100:.1f}% on the OOD views; plain fine-tuning on the "
                   f"target set {'loses' if lost > 0 else 'keeps'} {abs(lost) * 100:.1f} points of it "
                   f"({ft['ood_mean_accuracy'] * 100:.1f}%) while reaching {ft['id_test_accuracy'] * 100:.1f}% ID.")
        for m in ("ftp", "tpgm", "l2sp"):
            if m in best:
                r = best[m]
                d_ood = (r["ood_mean_accuracy"] - ft["ood_mean_accuracy"]) * 100
                d_id = (r["id_test_accuracy"] - ft["id_test_accuracy"]) * 100
                out.append(f"- {m.upper() if m != 'l2sp' else 'L2-SP'} vs plain fine-tuning: OOD mean {d_ood:+.1f} "
                           f"points, ID test {d_id:+.1f} points.")
    return out


def _plot(rows: list[dict], pretrained: dict, out_dir: Path | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = {"finetune": "tab:gray", "l2sp": "tab:blue", "ftp": "tab:red", "tpgm": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in METHOD_ORDER:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            ax.scatter([r["id_test_accuracy"] for r in mine], [r["ood_mean_accuracy"] for r in mine],
                       c=colors[method], label=method, alpha=0.8, s=[18 + 12 * r["epochs"] for r in mine])
    views = list(rows[0]["ood"]) if rows else []
    if views:
        ax.scatter([pretrained["id_test"]], [sum(pretrained[v] for v in views) / len(views)], marker="*", s=220,
                   c="black", label="pretrained, no fine-tuning")
    ax.set(xlabel="ID test accuracy (target domain)", ylabel="OOD accuracy (mean over shifts)",
           title="robust fine-tuning trials (marker size: epochs run before ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ftp_trials.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _result_from_registry(cfg: FTPConfig, mv, uri: str, report_dir) -> dict:
    import mlflow

    from pipelines import _tracking

    parent = mv.tags["search_run_id"]
    data, plot = _tracking.fetch_results(parent, "trials.json", "plots/ftp_trials.png", report_dir)
    rows, pretrained = data["rows"], data["pretrained"]
    best = next(r for r in rows if r["run_id"] == mv.tags["run_id"])
    return {"run_id": parent, "run_name": mlflow.MlflowClient().get_run(parent).info.run_name, "tracking_uri": uri,
            "rows": rows, "pretrained": pretrained, "table": results_table(rows, pretrained, cfg),
            "verdict": verdict(rows, pretrained), "champion": best, "plot": str(plot), "version": str(mv.version),
            "reused": True, "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"}


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("tune ftp", argv)


if __name__ == "__main__":
    raise SystemExit(main())
