"""The one sequence every registering pipeline stage runs, and the typed result it returns.

    setup MLflow -> check inputs -> hash the config -> reuse a model registered by the same config?
      -> start Ray -> start the stage's MLflow run -> log the resolved config and tags
      -> execute (the stage's own part: train on Ray, evaluate, log) -> register -> typed result

A pipeline subclasses :class:`Stage` and supplies only what is its own: :meth:`Stage.execute` (inside the run,
Ray up) and :meth:`Stage.from_registry` (the result of a reused model, read back from its MLflow run); it may
override :meth:`Stage.check` (fail early: data prepared, upstream model loadable),
:meth:`Stage.fingerprint` (what identifies the work, e.g. the config plus the upstream model's version) and
:meth:`Stage.resumed_run` (continue an interrupted stage's MLflow run instead of starting one).

Results are frozen dataclasses: the next stage, the CLI and the demo's report read them by attribute. Every
result carries the :class:`StageResult` fields; a pipeline's result subclass adds its own.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Mapping, TypeVar

from equiray_pipelines import tracking
from equiray_pipelines._common import DataConfig, TrackingConfig
from equiray_pipelines.calibration import calibration_from_tags
from equiray_pipelines.tracking import END_REASON, end_reason

log = logging.getLogger(__name__)


ConfigT = TypeVar("ConfigT")
ResultT = TypeVar("ResultT", bound="StageResult")


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """What every stage returns. ``registered`` is the ``models:/name@alias`` URI the stage's model went to."""

    pipeline: str
    run_id: str
    run_name: str = ""
    tracking_uri: str
    registered: str = ""
    version: str = ""
    model_uri: str = ""
    reused: bool = False
    seconds: float = 0.0
    table: str = ""  # the stage's results as a Markdown table (printed by the CLI, quoted by the report)
    verdict: tuple[str, ...] = ()  # one line per reading of the table
    plots: tuple[str, ...] = ()
    # the registered version's softmax temperature and its ECE / NLL before and after (equiray_pipelines.calibration);
    # empty for a model that is not an image classifier
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The result's scalar fields, for ``--json``-style printing (tables and live objects left out)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name not in ("table", "verdict") and isinstance(v, (str, int, float, bool, type(None))):
                out[f.name] = v
            elif f.name == "plots" and v:
                out[f.name] = list(v)
        return out


@dataclass(frozen=True)
class StageRun:
    """The context :meth:`Stage.execute` runs in: the active MLflow run and where things go."""

    run_id: str
    run_name: str
    experiment_id: str
    tracking_uri: str
    config_hash: str
    report_dir: Path | None
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(frozen=True)
class Outcome(Generic[ResultT]):
    """What :meth:`Stage.execute` hands back: the model to register (with its registry tags) and the result.
    ``model_uri=None`` registers nothing. The template fills in the result's registry fields."""

    result: ResultT
    model_uri: str | None
    tags: Mapping[str, Any] = field(default_factory=dict)


class Stage(Generic[ConfigT, ResultT]):
    """The template. ``pipeline`` names the stage in tags, run names and logs."""

    pipeline: ClassVar[str]

    def __init__(self, cfg: ConfigT, *, report_dir: str | Path | None = None, reuse: bool = False):
        self.cfg = cfg
        self.report_dir = Path(report_dir) if report_dir else None
        self.reuse = reuse

    # ------------------------------------------------------------------------------ what a pipeline supplies
    @property
    def tracking(self) -> TrackingConfig:
        return self.cfg.tracking  # type: ignore[attr-defined]

    def check(self) -> None:
        """Fail early and clearly, before anything starts (data, upstream models)."""

    def fingerprint(self) -> Any:
        """What identifies this work: a registered model made by the same fingerprint is reused."""
        return self.cfg

    def default_run_name(self) -> str:
        return f"{self.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"

    def tags(self) -> dict[str, str]:
        """Tags of the stage's MLflow run beside ``equiray.pipeline``."""
        return {}

    def calibration_view(self, outcome: Outcome) -> str | None:
        """The view of the validation split the softmax temperature of ``outcome``'s model is fitted on: the
        inputs it was trained for (upright unless overridden). None: no temperature (not an image classifier, or no
        ``data`` section to read a validation split from). A stage that calibrates its model itself puts the
        temperature in its :class:`Outcome`'s tags and is left alone."""
        return "upright" if isinstance(getattr(self.cfg, "data", None), DataConfig) else None

    def calibration_images(self) -> int:
        """How many validation (and test) images the temperature is fitted (and measured) on: the data section's
        ``max_eval``, at most ``CALIBRATION_IMAGES``. A stage whose model costs much per image may take fewer."""
        from equiray_pipelines.calibration import CALIBRATION_IMAGES

        data: DataConfig = self.cfg.data  # type: ignore[attr-defined]
        return min(data.max_eval or CALIBRATION_IMAGES, CALIBRATION_IMAGES)

    def resumed_run(self) -> str | None:
        """The id of an MLflow run this stage continues (an interrupted stage resumed: its config and tags were
        logged when it began), or None (the default) to start a new run. Called when nothing is reused, before
        Ray starts: the place to refuse a resume that has nothing to resume."""
        return None

    def execute(self, run: StageRun) -> Outcome[ResultT]:
        raise NotImplementedError

    def from_registry(self, mv, run: StageRun) -> ResultT:
        """The result of the model version ``mv``, made earlier by this same fingerprint, read back from MLflow."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the template
    def log_inputs(self) -> None:
        """The dataset the stage read, as its run's dataset inputs (a config with a ``data`` section)."""
        data = getattr(self.cfg, "data", None)
        if not isinstance(data, DataConfig):
            return
        try:
            tracking.log_data_inputs(data.dir, limits={"train": data.max_train, "test": data.max_eval})
        except Exception as exc:  # noqa: BLE001 - the inputs are a record; the stage's result stands without them
            log.warning("could not log the dataset inputs of %s: %s", data.dir, exc)

    @property
    def registered(self) -> str:
        return f"models:/{self.tracking.registered_model}@{self.tracking.alias}"

    def run(self) -> ResultT:
        import mlflow

        from equiray_pipelines._ray import init_ray, log_cluster_once

        uri = tracking.tracking_uri()
        experiment_id = tracking.setup(self.tracking.experiment, uri)
        self.check()
        cfg_hash = tracking.config_hash(self.fingerprint())
        if self.reuse:
            mv = tracking.find_version(self.tracking.registered_model, self.tracking.alias,
                                        config_hash_value=cfg_hash)
            if mv is not None:
                log.info("reusing %s (version %s): made by this same config", self.registered, mv.version)
                ctx = StageRun(mv.run_id, "", experiment_id, uri, cfg_hash, self.report_dir)
                return dataclasses.replace(self.from_registry(mv, ctx), reused=True, version=str(mv.version),
                                           registered=self.registered, model_uri=mv.source,
                                           calibration=calibration_from_tags(mv.tags))
        resumed = self.resumed_run()
        init_ray()
        log_cluster_once()
        run_name = self.tracking.run_name or self.default_run_name()
        with mlflow.start_run(run_id=resumed, run_name=None if resumed else run_name) as active:
            ctx = StageRun(active.info.run_id, run_name, experiment_id, uri, cfg_hash, self.report_dir)
            if resumed is None:
                tracking.log_config(self.cfg)
                mlflow.set_tags({"equiray.pipeline": self.pipeline, **tracking.source_tags(), **self.tags()})
            try:
                outcome = self.execute(ctx)
                tags = {**outcome.tags, **self._calibrated(outcome)}
            except KeyboardInterrupt as exc:  # Ctrl+C: the run ends KILLED (not FAILED), nothing is registered
                mlflow.set_tag(END_REASON, end_reason(exc))
                mlflow.end_run("KILLED")
                raise
            except Exception as exc:  # the run ends FAILED with the one line the user is shown
                mlflow.set_tag(END_REASON, end_reason(exc))
                mlflow.end_run("FAILED")
                raise
            self.log_inputs()
            result = outcome.result
            if outcome.model_uri is not None:
                version = tracking.register(outcome.model_uri, self.tracking.registered_model, self.tracking.alias,
                                             tags={**tags, "equiray.config_hash": cfg_hash})
                result = dataclasses.replace(result, version=version, registered=self.registered,
                                             model_uri=outcome.model_uri,
                                             calibration=calibration_from_tags({k: str(v) for k, v in tags.items()}))
        return dataclasses.replace(result, seconds=ctx.elapsed())

    def _calibrated(self, outcome: Outcome) -> dict[str, str]:
        """The registry tags of the temperature fitted for the model about to be registered (logged to the run
        as ``calibration_*`` metrics too; one line of progress); none when the stage calibrated it itself or
        :meth:`calibration_view` says there is nothing to calibrate."""
        import mlflow

        from equiray.data import read_split
        from equiray_pipelines._ray import say
        from equiray_pipelines.calibration import calibrate_model, calibration_tags, describe_calibration

        view = self.calibration_view(outcome)
        if outcome.model_uri is None or view is None or tracking.TEMPERATURE_TAG in outcome.tags:
            return {}
        data: DataConfig = self.cfg.data  # type: ignore[attr-defined]
        limit = self.calibration_images()
        val, test = (read_split(data.dir, split, limit=limit) for split in ("val", "test"))
        cal = calibrate_model(outcome.model_uri, val, test, fit_view=view, seed=0, batch_size=256)
        mlflow.log_metrics({f"calibration_{k}": v for k, v in cal.items()})
        say(f"[{self.pipeline}] " + describe_calibration({**cal, "view": view}))
        return calibration_tags(cal, view)
