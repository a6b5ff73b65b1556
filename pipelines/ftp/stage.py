"""The search as a registering stage: :class:`FTPTune` runs one Ray Tune experiment over the methods and their
knobs, tabulates and plots the trials, and registers the best trial's model as ``equiray-ftp@champion``.

The searcher is Optuna's TPE when installed (random search otherwise); every method's defaults are tried first;
ASHA stops weak trials early; trials are selected on ID validation accuracy only. Every epoch is a Tune
checkpoint and the search's MLflow run id is kept in ``<storage_path>/<name>/equiray.json``, so ``--resume``
(``cfg.resume``) continues an interrupted search in the same MLflow run without re-running finished trials.
"""
from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path

import torch

from equiray.config import to_dict
from equiray.errors import EquirayError
from equiray_pipelines import tracking
from equiray_pipelines.ftp.config import METHOD_ORDER, FTPConfig, method_params
from equiray_pipelines.ftp.report import plot_trials, results_table, verdict
from equiray_pipelines.ftp.result import FTPResult, TrialRow
from equiray_pipelines.ftp.task import Task, build_model, evaluate, load_task
from equiray_pipelines.ftp.trial import TrialContext, _trial, metric_key
from equiray_pipelines._ray import fit_noting_interrupts
from equiray_pipelines.progress import trial_progress
from equiray_pipelines.stage import Outcome, Stage, StageRun

log = logging.getLogger(__name__)


def run_tune(cfg: FTPConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> FTPResult:
    """Run (or ``cfg.resume`` an interrupted) search; tabulate, plot and register the champion."""
    return FTPTune(cfg, report_dir=report_dir, reuse=reuse).run()


class FTPTune(Stage[FTPConfig, FTPResult]):
    pipeline = "ftp"

    def __init__(self, cfg: FTPConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False):
        super().__init__(cfg, report_dir=report_dir, reuse=reuse and not cfg.resume)  # a resume is never reused

    def check(self) -> None:
        self.cfg.data.check()
        self.backbone, self.spec = tracking.load_model(self.cfg.backbone)

    @cached_property
    def _fingerprint(self) -> dict:
        return {"config": {**to_dict(self.cfg), "resume": False},
                "backbone": tracking.registry_version(self.cfg.backbone)}

    def fingerprint(self) -> dict:
        """The config (a resumed search is the same work) and the backbone's registry version."""
        return self._fingerprint

    @cached_property
    def name(self) -> str:
        """The Tune experiment's name, also the search's MLflow run name."""
        return self.cfg.name or f"ftp-{tracking.config_hash(self.fingerprint())}"

    @property
    def exp_dir(self) -> Path:
        return Path(self.cfg.storage_path).resolve() / self.name

    @property
    def state_file(self) -> Path:
        return self.exp_dir / "equiray.json"

    def default_run_name(self) -> str:
        return self.name

    def tags(self) -> dict[str, str]:
        return {"equiray.backbone": self.cfg.backbone}

    def resumed_run(self) -> str | None:
        from ray import tune

        if self.cfg.resume:
            if not tune.Tuner.can_restore(str(self.exp_dir)) or not self.state_file.exists():
                raise EquirayError(f"nothing to resume at {self.exp_dir}: run without --resume first "
                                   "(or --set name=...)")
            return json.loads(self.state_file.read_text())["parent_run_id"]
        if self.exp_dir.exists():
            raise EquirayError(f"a search named {self.name!r} already exists at {self.exp_dir}; pass --resume to "
                               f"continue it, or --set name=ANOTHER to start a new one")
        return None

    def execute(self, run: StageRun) -> Outcome[FTPResult]:
        import mlflow
        import ray

        cfg = self.cfg
        task = load_task(cfg)
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # one note per epoch
        if not cfg.resume:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({"parent_run_id": run.run_id}))
        ctx = TrialContext(cfg=cfg, task=ray.put(task), spec=self.spec,
                           state={k: v.cpu() for k, v in self.backbone.state_dict().items()},
                           tracking_uri=run.tracking_uri, experiment_id=run.experiment_id, parent_run_id=run.run_id)
        tuner, searcher_name = self._tuner(ctx)
        log.info("search %s: %d trials, %s, %s scheduler", self.name, cfg.search.num_samples, searcher_name,
                 cfg.search.scheduler)
        grid = fit_noting_interrupts(tuner)
        resume = (f"its state is saved in {self.exp_dir}: continue it with the same `equiray ftp tune` command plus "
                  "--resume (in `equiray demo`: --set ftp.resume=true); finished trials are not re-run")
        if grid is None or len(grid) < cfg.search.num_samples:  # the trials Tune stopped cannot end their runs
            tracking.end_unfinished_children(run.tracking_uri, run.experiment_id, run.run_id)
        if grid is None:  # Ctrl+C: the CLI prints this after "interrupted: " and exits 130
            raise KeyboardInterrupt(resume)
        if len(grid) < cfg.search.num_samples:
            raise EquirayError(f"the search stopped before every trial ran; {resume}")
        errors = [r.error for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} trials failed; first: {errors[0]}")
        best_res = grid.get_best_result(metric="val_accuracy", mode="max", scope="last")
        result = self._result(grid, best_res.metrics["run_id"], task, run, searcher_name)
        model_uri = self._log_champion(best_res, result.champion)
        client = mlflow.MlflowClient()
        for r in result.rows:  # trials ASHA stopped early never reached their own end: finished, said so (KILLED
            if r.epochs < cfg.train.epochs:  # reads as a failure in MLflow's UI; Ctrl+C is what ends a run KILLED)
                client.set_tag(r.run_id, "equiray.stopped_early", f"after epoch {r.epochs} (ASHA)")
                client.set_tag(r.run_id, "mlflow.note.content", f"stopped early by ASHA after epoch {r.epochs} of "
                                                                f"{cfg.train.epochs}: a weaker trial, not a fault")
                client.set_terminated(r.run_id, "FINISHED")
        best = result.champion
        return Outcome(result, model_uri, tags={"method": best.method, "run_id": best.run_id,
                                                "val_accuracy": f"{best.val_accuracy:.4f}",
                                                "search_run_id": run.run_id})

    def _tuner(self, ctx: TrialContext):
        """A new Tune experiment (searcher, ASHA) or, with ``cfg.resume``, the interrupted one restored."""
        from ray import tune

        cfg = self.cfg
        resources = {"cpu": cfg.resources.cpus_per_trial}
        if cfg.resources.gpus_per_trial:
            resources["gpu"] = cfg.resources.gpus_per_trial
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
        if cfg.resume:
            log.info("resuming %s: finished trials are kept, unfinished ones continue from their checkpoints",
                     self.exp_dir)
            return tune.Tuner.restore(str(self.exp_dir), trainable=trainable, resume_unfinished=True,
                                      resume_errored=True), "restored"
        searcher, searcher_name = _searcher(cfg)
        scheduler = None
        if cfg.search.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                      grace_period=min(cfg.search.grace_period, cfg.train.epochs),
                                      reduction_factor=cfg.search.reduction_factor)
        return tune.Tuner(
            trainable, param_space=cfg.space.tune_space(),
            tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", search_alg=searcher,
                                        scheduler=scheduler, num_samples=cfg.search.num_samples,
                                        max_concurrent_trials=cfg.resources.max_concurrent or None),
            run_config=tune.RunConfig(name=self.name, storage_path=str(self.exp_dir.parent), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[trial_progress(cfg.search.num_samples, prefix="ftp")],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1))), searcher_name

    def _result(self, grid, best_run_id: str, task: Task, run: StageRun, searcher_name: str) -> FTPResult:
        """Tabulate and plot the finished search and log its table, trials and plot to the search's run; the
        champion is the trial whose MLflow run is ``best_run_id``."""
        import mlflow

        cfg = self.cfg
        pretrained = evaluate(build_model(self.spec, self.backbone.state_dict(), new_head=False, seed=0),
                              task.test_views(), task.labels)
        rows = _rows(grid, cfg)
        best = next(r for r in rows if r.run_id == best_run_id)
        table = results_table(rows, pretrained, cfg)
        plot = plot_trials(rows, pretrained, run.report_dir)
        mlflow.log_artifact(str(plot), "plots")
        mlflow.log_text(table, "methods.md")
        mlflow.log_text(json.dumps({"rows": [r.to_dict() for r in rows], "pretrained": pretrained}, indent=2),
                        "trials.json")
        mlflow.log_metrics({"trials": len(rows), "search_seconds": run.elapsed(),
                            "champion_val_accuracy": best.val_accuracy})
        return FTPResult(pipeline=self.pipeline, run_id=run.run_id, run_name=run.run_name,
                         tracking_uri=run.tracking_uri, table=table, verdict=tuple(verdict(rows, pretrained)),
                         plots=(str(plot),), rows=tuple(rows), pretrained=pretrained, champion=best,
                         plot=str(plot), experiment_dir=str(self.exp_dir), searcher=searcher_name)

    def _log_champion(self, result, row: TrialRow) -> str:
        """Log the best trial's final weights (its latest checkpoint) as the model of its own MLflow run."""
        import mlflow

        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "trial.pt", map_location="cpu", weights_only=False)["model"]
        model = build_model(self.spec, state, new_head=False, seed=0)
        with mlflow.start_run(run_id=row.run_id, nested=True):
            return tracking.log_model(model, {**self.spec, "kwargs": dict(self.spec.get("kwargs", {})),
                                               "task": self.cfg.task.target_view})

    def calibration_view(self, outcome: Outcome) -> str | None:
        """The in-distribution target domain the champion was fine-tuned and selected on."""
        return self.cfg.task.target_view

    def from_registry(self, mv, run: StageRun) -> FTPResult:
        import mlflow

        parent = mv.tags["search_run_id"]
        data, plot = tracking.fetch_results(parent, "trials.json", "plots/ftp_trials.png", run.report_dir)
        rows = tuple(TrialRow.from_dict(d) for d in data["rows"])
        pretrained = data["pretrained"]
        best = next(r for r in rows if r.run_id == mv.tags["run_id"])
        return FTPResult(pipeline=self.pipeline, run_id=parent,
                         run_name=mlflow.MlflowClient().get_run(parent).info.run_name, tracking_uri=run.tracking_uri,
                         table=results_table(rows, pretrained, self.cfg), verdict=tuple(verdict(rows, pretrained)),
                         plots=(str(plot),), rows=rows, pretrained=pretrained, champion=best, plot=str(plot))


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

            from equiray_pipelines._ray import verbose

            if not verbose():  # "A new study created in memory ...": a library's line, shown with -v
                optuna.logging.set_verbosity(optuna.logging.WARNING)
            return OptunaSearch(points_to_evaluate=points, sampler=optuna.samplers.TPESampler(seed=cfg.search.seed)), \
                "optuna TPE"
    return BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.search.seed,
                                 max_concurrent=cfg.resources.max_concurrent), "random"


def _rows(grid, cfg: FTPConfig) -> list[TrialRow]:
    """Every trial that reported at least one epoch, methods in table order, the best first within each."""
    rows = []
    for r in grid:
        m = r.metrics
        if not m or "val_accuracy" not in m:
            continue
        hist = r.metrics_dataframe
        rows.append(TrialRow.from_dict({
            **method_params(r.config), "run_id": m["run_id"], "epochs": int(m["epoch"]) + 1,
            "val_accuracy": m["val_accuracy"], "id_test_accuracy": m["id_test_accuracy"],
            "ood_mean_accuracy": m["ood_mean_accuracy"],
            "ood": {v: m[f"ood/{metric_key(v)}"] for v in cfg.task.ood_views},
            "epoch_seconds": float(hist["epoch_seconds"].mean()) if hist is not None and len(hist)
            else m["epoch_seconds"]}))
    rows.sort(key=lambda r: (METHOD_ORDER.index(r.method), -r.val_accuracy))
    return rows
