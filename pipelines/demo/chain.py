"""The main job: every stage at demo scale on one machine, ending in a report.

Stages: (1) prepare Fashion-MNIST as Parquet shards; (2) pretrain a backbone with Ray Train, register it as
``equiray-backbone@pretrained`` and evaluate it on upright, C4-rotated and corrupted views; (3) augmentation
ensembles on Ray Train, OSP/KL vs ensemble size; (4) distil the ensemble into one student; (5) canonicalization
variants around the backbone as Ray Tune trials (the papers' C8 protocol); (6) any angle: a canonicalizer with a
continuous pose trained on turned and mirrored images (``equiray-canon-any-angle@champion``); (7) a robust
fine-tuning search (FTP, TPGM, L2-SP) on Ray Tune; (8) Monomial-NFN: a zoo of small CNNs trained on Ray tasks,
metanetworks that read their accuracy off the weights, and the same for the ensemble's members, used to leave the
weakest out of the average; (9) robust: every candidate judged upright, at any angle and mirrored, the champion
registered as ``equiray-robust@champion``; (10) serve: it behind Ray Serve, a few real HTTP requests (upright and
rotated test images), the answers printed, the endpoint shut down.

Each stage returns its typed result; the next stage and the report read them by attribute. The demo itself is one
MLflow run (experiment ``equiray-demo``): its config, the report and plots as artifacts, each stage's minutes as
metrics, a tag per stage naming that stage's run (and the stage's run tagged back with the demo's); it ends KILLED
on Ctrl+C and FAILED on an error, like every stage's run.

    equiray demo [--config configs/demo.yaml] [--set pretrain.train.epochs=1]
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from equiray.config import to_dict
from equiray_pipelines import canon, distill, ensemble, ftp, nfn, pretrain, robust, tracking
from equiray_pipelines._ray import say
from equiray_pipelines.progress import Progress, duration
from equiray_pipelines.demo.config import STAGES, DemoConfig
from equiray_pipelines.demo.report import backbone_table, write_report
from equiray_pipelines.demo.results import DemoResult, NFNStageResult
from equiray_pipelines.demo.serving import serve_stage
from equiray_pipelines.tracking import END_REASON, end_reason

log = logging.getLogger(__name__)


def _banner(step: int, total: int, text: str) -> None:
    say(f"\n=== [{step}/{total}] {text}")


# What each stage took in `equiray demo --fresh` on a 2-core machine without a GPU (README, "What each stage
# costs"): the demo's time left is these minutes for the stages to come, scaled by how the stages so far compared
# with theirs (a reused stage, a faster machine: less left)
EXPECTED_MINUTES = {"data": 0.05, "pretrain": 2.4, "ensemble": 1.5, "distill": 0.6, "canon": 1.1, "any_angle": 5.9,
                    "ftp": 0.8, "nfn": 0.7, "robust": 1.6, "serve": 0.3}


class _DemoProgress:
    """The demo as a whole: a bar over the expected minutes of its stages (bars mode) and, under every stage's
    banner, how far the demo is and the time left at the pace so far."""

    def __init__(self, stages: list[str]):
        self.expected = [60 * EXPECTED_MINUTES.get(s, 1.0) for s in stages]
        self.started = time.perf_counter()
        self.bar = Progress(100, desc="demo", unit="%", every_s=None)

    def at_stage(self, index: int) -> str:
        """The line for the stage ``index`` about to start (the ones before it done); moves the bar."""
        done, total = sum(self.expected[:index]), sum(self.expected)
        elapsed = time.perf_counter() - self.started
        # the pace so far against the expected, shrunk toward 1 by two expected minutes (the first stages are
        # short: a few seconds either way must not multiply the rest)
        pace = (elapsed + 120) / (done + 120)
        share = round(100 * done / total)
        self.bar.update(share - self.bar.n)
        left = f", ~{duration((total - done) * pace)} left" if index else ""
        return f"    demo: {share}% of the expected work done, {duration(elapsed)} elapsed{left}"

    def close(self) -> None:
        self.bar.update(100 - self.bar.n)
        self.bar.close()


def _reused(result) -> None:
    if result.reused:
        say(f"    reused {result.registered} version {result.version} (same config; --fresh retrains)")


EXPERIMENT = "equiray-demo"


class _DemoRun:
    """The demo's own MLflow run, made through the client (each stage starts its own active run meanwhile)."""

    def __init__(self):
        import mlflow

        uri = tracking.tracking_uri()
        experiment_id = tracking.setup(EXPERIMENT, uri)
        self.client = mlflow.MlflowClient(uri)
        self.run_id = self.client.create_run(
            experiment_id, run_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"equiray.pipeline": "demo", **tracking.source_tags(),
                  "mlflow.note.content": "equiray demo: every stage at demo scale; the report and plots are this "
                                         "run's artifacts, the tags equiray.run.<stage> name each stage's run"},
        ).info.run_id

    def log_config(self, cfg: DemoConfig) -> None:
        import yaml

        self.client.log_text(self.run_id, yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")

    def finish(self, out: DemoResult, report_dir: Path) -> None:
        """Link the stages' runs, log the minutes and the report, end FINISHED. The stages' own results are safe
        by now: a failure here is a warning, not a failed demo."""
        try:
            self._link(out, report_dir)
        except Exception as exc:  # noqa: BLE001
            log.warning("the demo's MLflow run %s misses its links or report: %s", self.run_id, exc)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _link(self, out: DemoResult, report_dir: Path) -> None:
        for stage, run_id in out.stage_runs():
            self.client.set_tag(self.run_id, f"equiray.run.{stage}", run_id)
            self.client.set_tag(run_id, "equiray.demo_run", self.run_id)
        for stage, sec in out.stage_seconds:
            self.client.log_metric(self.run_id, f"minutes_{stage}", sec / 60)
        if out.robust is not None and out.robust.champion:
            self.client.set_tag(self.run_id, "equiray.robust_champion", out.robust.champion)
        self.client.log_artifacts(self.run_id, str(report_dir), "report")

    def end(self, status: str, reason: str | None = None) -> None:
        if reason:
            self.client.set_tag(self.run_id, END_REASON, reason)
        self.client.set_terminated(self.run_id, status)


def run(cfg: DemoConfig, *, report_dir: str | os.PathLike = "reports") -> DemoResult:
    demo_run = _DemoRun()
    try:
        demo_run.log_config(cfg)
        out = _run(cfg, demo_run, report_dir=report_dir)
    except KeyboardInterrupt as exc:
        demo_run.end("KILLED", end_reason(exc))
        raise
    except BaseException as exc:
        demo_run.end("FAILED", end_reason(exc))
        raise
    demo_run.finish(out, Path(report_dir))
    say(f"run:      experiment {EXPERIMENT}, run {demo_run.run_id} (the report, plots and a tag per stage's run)")
    say(f"finished in {out.seconds / 60:.1f} min")
    return out


def _run(cfg: DemoConfig, demo_run: _DemoRun, *, report_dir: str | os.PathLike) -> DemoResult:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = ["data", *cfg.stages]
    total = len(stages)

    began: dict[str, float] = {}

    progress = _DemoProgress(stages)

    def banner(stage: str, text: str) -> None:
        began[stage] = time.perf_counter()  # a stage runs from its banner to the next one (or the report)
        _banner(stages.index(stage) + 1, total, text)
        say(progress.at_stage(stages.index(stage)))

    banner("data", f"data: {cfg.pretrain.data.source} -> {cfg.pretrain.data.dir} (Parquet shards)")
    meta = cfg.pretrain.data.prepare()
    say("    " + ", ".join(f"{s}: {n}" for s, n in meta["rows"].items()) + f" images {tuple(meta['shape'])}")

    out = DemoResult()
    if "pretrain" in cfg.stages:
        banner("pretrain", f"pretrain: {cfg.pretrain.model.name} on upright data with Ray Train, "
               f"{cfg.pretrain.train.epochs} epochs")
        pre = pretrain.run(cfg.pretrain, report_dir=report_dir, reuse=cfg.reuse)
        _reused(pre)
        say("\n" + backbone_table(pre, cfg.pretrain.eval.group))
        out = dataclasses.replace(out, pretrain=pre, tracking_uri=pre.tracking_uri)
    if "ensemble" in cfg.stages:
        e = cfg.ensemble
        banner("ensemble", f"ensembles: {len(e.settings)} settings x {e.members} members on Ray Train, then OSP/KL "
               f"vs ensemble size under {e.group}")
        trained = ensemble.run_train(e, reuse=cfg.reuse)
        _reused(trained)
        ev = ensemble.run_eval(e, run_id=trained.run_id, report_dir=report_dir, ensembles=trained.ensembles)
        say("\n" + ev.table + "\n" + "\n".join(ev.verdict))
        out = dataclasses.replace(out, ensemble=trained, ensemble_eval=ev, tracking_uri=trained.tracking_uri)
    if "distill" in cfg.stages:
        banner("distill", f"distill: {cfg.distill.teacher} -> one {cfg.distill.student.name} student")
        dist = distill.run(cfg.distill, report_dir=report_dir, reuse=cfg.reuse)
        say("\n" + dist.table)
        out = dataclasses.replace(out, distill=dist, tracking_uri=dist.tracking_uri)
    if "canon" in cfg.stages:
        c = cfg.canon
        banner("canon", f"canonicalization: {len(c.variants())} variants around {c.backbone} as Ray Tune trials, "
               f"judged on {c.eval_group}-rotated test sets")
        can = canon.run_sweep(c, report_dir=report_dir, reuse=cfg.reuse)
        _reused(can)
        say("\n" + can.table + "\n" + "\n".join(can.verdict))
        out = dataclasses.replace(out, canon=can, tracking_uri=can.tracking_uri)
    if "any_angle" in cfg.stages:
        a = cfg.any_angle
        variants = a.variants()
        banner("any_angle", f"any angle: {'; '.join(v.name for v in variants)}, on {a.data.max_train or 'all'} "
               f"training images turned at random, as Ray Tune trial{'s' if len(variants) > 1 else ''}"
               + ("; then the two mixed in probability" if a.mix else ""))
        aa = canon.run_sweep(a, report_dir=report_dir / "any_angle", reuse=cfg.reuse)
        _reused(aa)
        say("\n" + aa.table)
        out = dataclasses.replace(out, any_angle=aa, tracking_uri=aa.tracking_uri)
    if "ftp" in cfg.stages:
        f = cfg.ftp
        banner("ftp", f"robust fine-tuning: {f.search.num_samples} Ray Tune trials over {', '.join(f.space.methods)} "
               f"({f.search.searcher}, {f.search.scheduler}), target {f.task.target_view}")
        ft = ftp.run_tune(f, report_dir=report_dir, reuse=cfg.reuse)
        _reused(ft)
        say("\n" + ft.table + "\n" + "\n".join(ft.verdict))
        out = dataclasses.replace(out, ftp=ft, tracking_uri=ft.tracking_uri)
    if "nfn" in cfg.stages:
        banner("nfn", f"Monomial-NFN: a zoo of {cfg.nfn.zoo.nets} small CNNs on Ray tasks, metanetworks predicting "
               "their accuracy from weights; then the ensemble's members")
        nf = _nfn_stage(cfg, out.ensemble, report_dir)
        out = dataclasses.replace(out, nfn=nf, tracking_uri=nf.train.tracking_uri)
    if "robust" in cfg.stages:
        r = cfg.robust
        banner("robust", f"robust champion: the candidates judged upright, at any angle and mirrored, one Ray task "
               f"each; the best SO(2) within {r.upright_tolerance:g} point of the backbone's upright accuracy (within "
               f"{r.so2_level:g} of it: level, the better upright wins)")
        rb = robust.run(r, report_dir=report_dir, reuse=cfg.reuse)
        _reused(rb)
        say("\n" + rb.table + "\n" + "\n".join(rb.verdict))
        out = dataclasses.replace(out, robust=rb, tracking_uri=rb.tracking_uri)
    if "serve" in cfg.stages:
        banner("serve", f"serve: {cfg.serve.model} behind Ray Serve, {cfg.serve_images} test images upright and "
               "rotated, sent over HTTP")
        srv = serve_stage(cfg.serve, cfg.pretrain.data.dir, cfg.serve_images)
        say(f"    {srv.url}: {srv.requests} requests in {srv.seconds:.1f} s, then shut down; version {srv.version}, "
            f"test 0 as a raw PNG body -> {srv.raw_png_label}")
        say("\n" + srv.table)
        out = dataclasses.replace(out, serve=srv, tracking_uri=out.tracking_uri or srv.tracking_uri)
    progress.close()
    elapsed = time.perf_counter() - t0
    marks = [*began.values(), time.perf_counter()]
    out = dataclasses.replace(out, stage_seconds=tuple((k, b - a) for k, a, b in zip(began, marks, marks[1:])))
    out = dataclasses.replace(out, demo_run_id=demo_run.run_id, tracking_uri=out.tracking_uri or tracking.tracking_uri())
    report = write_report(report_dir / "demo.md", cfg, meta, out, elapsed)
    say(f"\nreport:   {report.resolve()}")
    say(f"mlflow:   {out.tracking_uri}  (browse: .venv/bin/mlflow ui --backend-store-uri {out.tracking_uri})")
    for uri, version in out.registered():
        say(f"model:    {uri} (version {version})")
    return dataclasses.replace(out, report=str(report), seconds=elapsed)


def _nfn_stage(cfg: DemoConfig, trained: ensemble.EnsembleTrainResult | None, report_dir: Path) -> NFNStageResult:
    """Zoo (reused when the same zoo config wrote it), metanetworks, member zoo, selection."""
    n = cfg.nfn
    zoo_json = Path(n.zoo.out) / "zoo.json"
    same = zoo_json.exists() and json.loads(zoo_json.read_text()).get("config") == to_dict(n.zoo)
    if same and cfg.reuse:
        say(f"    reused the zoo in {n.zoo.out} (same config)")
    else:
        z = nfn.run_zoo(dataclasses.replace(n.zoo, overwrite=True))
        say(f"    {z.nets} nets in {z.seconds:.0f} s -> {z.out}; test accuracy "
            f"{z.test_accuracy['min'] * 100:.0f}-{z.test_accuracy['max'] * 100:.0f}%")
    res = nfn.run_train(n.train, report_dir=report_dir, reuse=cfg.reuse)
    say("\n" + res.table + "\n" + "\n".join(res.verdict))
    result = NFNStageResult(train=res, zoo_nets=json.loads(zoo_json.read_text())["nets"])
    if trained is None:
        return result
    member_json = Path(n.member_zoo) / "zoo.json"
    source = f"ensemble train run {trained.run_id}"
    if not (cfg.reuse and member_json.exists() and json.loads(member_json.read_text()).get("source") == source):
        nfn.run_zoo(dataclasses.replace(n.zoo, from_ensemble=trained.run_id, out=n.member_zoo, overwrite=True,
                                        ensemble_experiment=cfg.ensemble.tracking.experiment))
    members = nfn.run_train(dataclasses.replace(n.members, zoo=n.member_zoo), report_dir=report_dir / "members",
                            reuse=cfg.reuse)
    say("\n" + members.table)
    e = cfg.ensemble
    sel = ensemble.run_select(dataclasses.replace(e, eval=dataclasses.replace(
        e.eval, select_by="nfn", drop_fraction=n.drop_fraction, nfn_model=members.registered)),
        run_id=trained.run_id, ensembles=trained.ensembles, report_dir=report_dir)
    say("\n" + sel.table + "\n" + "\n".join(sel.verdict))
    return dataclasses.replace(result, members=members, selection=sel)
