"""The sweep as a stage: fan the variants out as Tune trials, time every model on the driver, tabulate, plot, and
register the best variant as ``equiray-canon@champion``."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from equiray.canon import Variant, paired_latencies
from equiray.config import to_dict
from equiray.errors import ConfigError
from equiray.data import resize
from equiray_pipelines.canon.config import CanonConfig
from equiray_pipelines.canon.report import plot_angle_curves, plot_variants, results_table, verdict
from equiray_pipelines.canon.trial import SweepRun, run_trial
from equiray_pipelines.progress import trial_progress
from equiray_pipelines.stage import Outcome, Stage, StageResult, StageRun
from equiray_pipelines.tracking import END_REASON, end_reason

log = logging.getLogger(__name__)

__all__ = ["CanonResult", "CanonSweep", "run_sweep"]


@dataclass(frozen=True, kw_only=True)
class CanonResult(StageResult):
    """``rows``: one dict per variant, in the config's order: the variant's fields (``name``, ``kind``, ``group``,
    ``augment``, ``prior_weight``, ``backbone``), its test accuracies (``upright_accuracy``, ``cn_avg_accuracy``,
    ``accuracy_rot_{e}``), ``identity_rate`` (canonicalized variants), ``run_id``, ``model_uri``, and its cost
    (``ms_per_image``, ``overhead``, ``backbone_ms_per_image``). ``champion``: the registered variant's name;
    ``plot``: the accuracy plot's path (also in ``plots``)."""

    rows: tuple[dict, ...] = ()
    champion: str = ""
    plot: str = ""


def run_sweep(cfg: CanonConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> CanonResult:
    """Fan the variants out as Tune trials, time each model, tabulate, plot, register the champion."""
    return CanonSweep(cfg, report_dir=report_dir, reuse=reuse).run()


class CanonSweep(Stage[CanonConfig, CanonResult]):
    pipeline = "canon"

    @functools.cached_property
    def backbone(self) -> tuple[nn.Module, dict]:
        """The pretrained backbone and its spec, from the registry."""
        from equiray_pipelines import tracking

        return tracking.load_model(self.cfg.backbone)

    def check(self) -> None:
        self.cfg.data.check()
        self.backbone  # noqa: B018 - a clear error now if it is not registered

    def fingerprint(self) -> dict:
        """The config (its canonicalizer options as set, as when they were a dict) and the backbone's version."""
        from equiray_pipelines import tracking

        config = {**to_dict(self.cfg), "canonicalizers": self.cfg.canonicalizers.given()}
        return {"config": config, "backbone": tracking.registry_version(self.cfg.backbone)}

    def default_run_name(self) -> str:
        return f"canon-sweep-{time.strftime('%Y%m%d-%H%M%S')}"

    def tags(self) -> dict[str, str]:
        return {"equiray.backbone": self.cfg.backbone}

    def execute(self, run: StageRun) -> Outcome[CanonResult]:
        import mlflow

        cfg = self.cfg
        bare, spec = self.backbone
        data = load_data(cfg)
        if data[0].shape[1] != spec["in_chans"]:
            raise ConfigError(f"data has {data[0].shape[1]} channels but {cfg.backbone} takes {spec['in_chans']}")
        rows = run_trials(cfg, cfg.variants(), data, (spec, {k: v.cpu() for k, v in bare.state_dict().items()}),
                          SweepRun(run.tracking_uri, run.experiment_id, run.run_id), name=run.run_name)
        if cfg.mix:
            rows.append(mixture_row(cfg, rows, data[2], data[3], SweepRun(run.tracking_uri, run.experiment_id,
                                                                          run.run_id)))
        rows = time_variants(rows, bare, data[2][:cfg.latency_batch])
        table = results_table(rows, cfg.eval_group)
        best = max(rows, key=lambda r: (r[cfg.select], r["upright_accuracy"]))
        plot = plot_variants(rows, cfg.eval_group, self.report_dir)
        mlflow.log_artifact(str(plot), "plots")
        curve = plot_angle_curves(rows, self.report_dir)
        if curve is not None:
            mlflow.log_artifact(str(curve), "plots")
        mlflow.log_text(table, "variants.md")
        mlflow.log_text(json.dumps(rows, indent=2), "variants.json")
        mlflow.log_metrics({"variants": len(rows), "sweep_seconds": run.elapsed(),
                            f"champion_{cfg.select}": best[cfg.select]})
        result = CanonResult(pipeline=self.pipeline, run_id=run.run_id, run_name=run.run_name,
                             tracking_uri=run.tracking_uri, table=table, verdict=tuple(verdict(rows, cfg.eval_group)),
                             plots=(str(plot),) + ((str(curve),) if curve else ()), rows=tuple(rows),
                             champion=best["name"], plot=str(plot))
        tags = {"variant": best["name"], "run_id": best["run_id"], cfg.select: f"{best[cfg.select]:.4f}",
                "sweep_run_id": run.run_id}
        return Outcome(result, best["model_uri"], tags)

    def calibration_view(self, outcome: Outcome) -> str | None:
        """The champion's training inputs: turned at random (so2 / o2) for the any-angle variants, else upright."""
        row = next(r for r in outcome.result.rows if r["name"] == outcome.result.champion)
        return row.get("rotations") if row.get("rotations") in ("so2", "o2") else "upright"

    def from_registry(self, mv, run: StageRun) -> CanonResult:
        """The sweep behind the registered champion (its ``sweep_run_id`` tag): its rows and plot, read back."""
        import mlflow

        from equiray_pipelines import tracking

        parent = mv.tags["sweep_run_id"]
        rows, plot = tracking.fetch_results(parent, "variants.json", "plots/canon_variants.png", self.report_dir)
        curve = tracking.fetch_plot(parent, "plots/canon_angles.png", self.report_dir)
        return CanonResult(pipeline=self.pipeline, run_id=parent,
                           run_name=mlflow.MlflowClient().get_run(parent).info.run_name,
                           tracking_uri=run.tracking_uri, table=results_table(rows, self.cfg.eval_group),
                           verdict=tuple(verdict(rows, self.cfg.eval_group)),
                           plots=(str(plot),) + ((str(curve),) if curve else ()), rows=tuple(rows),
                           champion=mv.tags.get("variant", ""), plot=str(plot))


def load_data(cfg: CanonConfig) -> tuple[torch.Tensor, ...]:
    """(train images, labels, test images, labels), prepared if missing, resized as the config says."""
    from equiray.data import read_split

    cfg.data.prepare()
    x, y = read_split(cfg.data.dir, "train", limit=cfg.data.max_train)
    xt, yt = read_split(cfg.data.dir, "test", limit=cfg.data.max_eval)
    return resize(x, cfg.data.resize), y, resize(xt, cfg.data.resize), yt


def run_trials(cfg: CanonConfig, variants: list[Variant], data: tuple[torch.Tensor, ...],
               backbone: tuple[dict, dict], sweep: SweepRun, *, name: str) -> list[dict]:
    """Every variant as one Tune trial with the config's resources (the Tune experiment ``name``d as the sweep's
    MLflow run); one row per variant, in ``variants``' order."""
    from ray import tune

    resources = {"cpu": cfg.resources.cpus_per_trial}
    if cfg.resources.gpus_per_trial:
        resources["gpu"] = cfg.resources.gpus_per_trial
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg, data=data, backbone=backbone, sweep=sweep), resources)
    tuner = tune.Tuner(
        trainable, param_space={"variant": tune.grid_search([dataclasses.asdict(v) for v in variants])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent or None),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg.storage_path).resolve()),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=1),
                                  callbacks=[trial_progress(len(variants), prefix="canon")]))
    from equiray_pipelines import tracking
    from equiray_pipelines._ray import fit_noting_interrupts

    grid = fit_noting_interrupts(tuner)
    if grid is None:  # Ctrl+C: Tune stopped the trials; the CLI says "interrupted" and exits 130
        tracking.end_unfinished_children(sweep.tracking_uri, sweep.experiment_id, sweep.parent_run_id)
        raise KeyboardInterrupt
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(variants)} variants failed; first: {errors[0]}")
    rows = [{**r.config["variant"], **{k: v for k, v in r.metrics.items()  # Tune adds its own fields: not these
                                       if k.endswith("accuracy") or k.startswith(("accuracy_rot", "accuracy_angle"))
                                       or k in ("identity_rate", "run_id", "model_uri")}} for r in grid]
    order = {v.name: i for i, v in enumerate(variants)}
    return sorted(rows, key=lambda r: order[r["name"]])


def mixture_row(cfg: CanonConfig, rows: list[dict], x: torch.Tensor, y: torch.Tensor, sweep: SweepRun) -> dict:
    """The mixture of the best canonicalized variant and the best baseline (by ``cfg.select``), judged as the
    trials judge a variant (here, on the driver: no training) and logged as a model in a run of its own nested
    under the sweep's; its row as the trials' rows read."""
    import mlflow

    from equiray.canon import evaluate_variant
    from equiray.models import Mixture, OrbitAveraged
    from equiray.models.orbit import parse_orbit
    from equiray_pipelines import tracking
    from equiray_pipelines._ray import say

    def best(canonicalized: bool) -> dict:
        return max((r for r in rows if (r["kind"] != "none") == canonicalized),
                   key=lambda r: (r[cfg.select], r["upright_accuracy"]))

    members = [best(True), best(False)]
    weights = [cfg.mix_weight, 1.0 - cfg.mix_weight]
    orbits = [parse_orbit(o) for o in cfg.mix_tta or ("", "")]
    loaded = [tracking.load_model(r["model_uri"]) for r in members]
    model = Mixture([m if o is None else OrbitAveraged(m, o[0], modulo=o[1]) for (m, _), o in zip(loaded, orbits)],
                    weights)
    first = loaded[0][1]

    def member_spec(s: dict, orbit: tuple[str, str | None] | None) -> dict:
        own = {"name": s["name"], "kwargs": dict(s.get("kwargs", {}))}
        if orbit is None:
            return own
        return {"name": "orbit_averaged", "kwargs": {"backbone": own["name"], "backbone_kwargs": own["kwargs"],
                                                     "group": orbit[0], "modulo": orbit[1]}}

    spec = {**{k: first[k] for k in ("in_chans", "num_classes", "classes", "input_shape", "data") if k in first},
            "name": "mixture", "kwargs": {
                "members": [member_spec(s, o) for (_, s), o in zip(loaded, orbits)], "weights": weights}}

    def label(r: dict, w: float, orbit: tuple[str, str | None] | None) -> str:
        tta = "" if orbit is None else f", averaged over {orbit[0]}{f'/{orbit[1]}' if orbit[1] else ''}"
        return f"{r['name']} ({w:g}{tta})"

    name = "mixture: " + " + ".join(label(r, w, o) for r, w, o in zip(members, weights, orbits))
    say(f"[canon] {name}: judged on the test views")
    metrics = evaluate_variant(model, x, y, cfg.eval_group, angles=cfg.curve_angles())
    metrics.pop("identity_rate", None)
    client = mlflow.MlflowClient()
    run = client.create_run(sweep.experiment_id, run_name="mixture", tags={
        "mlflow.parentRunId": sweep.parent_run_id, "equiray.pipeline": "canon", "equiray.variant": name,
        **{f"member_{i}": r["name"] for i, r in enumerate(members)},
        **{f"member_{i}_model_uri": r["model_uri"] for i, r in enumerate(members)}})
    try:
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, float(v))
        with mlflow.start_run(run_id=run.info.run_id, nested=True):
            model_uri = tracking.log_model(model, spec, name="model")
    except BaseException as exc:
        client.set_tag(run.info.run_id, END_REASON, end_reason(exc))
        client.set_terminated(run.info.run_id, "KILLED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    canon = members[0]
    return {"name": name, "kind": "mixture", "group": canon["group"], "augment": False,
            "prior_weight": canon["prior_weight"], "backbone": canon["backbone"], "pose": canon.get("pose"),
            "rotations": canon.get("rotations"), **metrics, "run_id": run.info.run_id, "model_uri": model_uri}


def time_variants(rows: list[dict], bare: nn.Module, batch: torch.Tensor) -> list[dict]:
    """``rows`` with every variant's ms per image and overhead over the bare backbone on ``batch``, timed here, one
    model after the other (timings from concurrent trials would measure their contention); also logged to each
    variant's MLflow run."""
    import mlflow

    from equiray_pipelines import tracking

    models = [tracking.load_model(r["model_uri"])[0] for r in rows]
    lat = paired_latencies(bare, models, batch)
    client = mlflow.MlflowClient()
    out = []
    for r, ms, overhead in zip(rows, lat.ms_per_image, lat.overhead):
        out.append({**r, "ms_per_image": ms, "overhead": overhead, "backbone_ms_per_image": lat.backbone_ms})
        client.log_metric(r["run_id"], "ms_per_image", ms)
        client.log_metric(r["run_id"], "overhead_vs_backbone", overhead)
    return out
