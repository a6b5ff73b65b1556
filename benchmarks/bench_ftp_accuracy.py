"""FTP's claim tested over seeds (issue 22): robust fine-tuning methods (FTP, TPGM, L2-SP, plain fine-tuning and
SPD, FTP's 2024 successor), each tuned by the same search budget, then trained again with many seeds; ID and OOD
accuracy with 95% intervals.

The task is ``equiray ftp tune``'s (``--config``, default ``configs/ftp.yaml``): fine-tune the registered backbone
(upright Fashion-MNIST) on a small labelled set of another domain (low contrast) with a new head; OOD = the domains
the backbone was good at (upright, noise, blur, pixelation, occlusion). The FTP paper's claim (Tian et al. 2023):
better OOD accuracy than the other methods at equal ID accuracy.

1. **Tuning, the same budget for every method**: the pipeline's own search (Ray Tune, Optuna TPE, ASHA, the
   method's defaults tried first, selected on ID validation accuracy only) over one method at a time,
   ``--trials`` trials each, training seed 0. It registers its champion as ``bench-ftp-<method>`` in the MLflow
   store's ``equiray-bench-ftp`` experiment.
2. **Seeds**: each method's tuned point trained again for the full epochs with seeds 1..``--seeds`` (the new head's
   initialisation and the batch order; seed s is the same for every method), one Ray task of one CPU per run.
3. **Report**: ID test and OOD mean accuracy per method, mean +- 95% interval over the seeds; FTP against each other
   method paired seed by seed, "above / level / below" decided by the interval (:func:`equiray.stats.compare`),
   and SPD against each the same way when it ran (its paper's claim: better OOD than FTP and the others).

Needs the registered backbone (``make demo`` or ``equiray pretrain`` first).

    .venv/bin/python benchmarks/bench_ftp_accuracy.py [--trials 8] [--seeds 10] [--methods finetune,l2sp,ftp,tpgm,spd]
                                                       [--config configs/ftp.yaml] [--set KEY=VALUE ...] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit, machine  # noqa: E402


def train_seed(cfg, task, spec: dict, state: dict, point: dict, seed: int) -> dict:
    """One run of a tuned point: the trial's fine-tuner (:func:`equiray_pipelines.ftp.trial.fine_tuner`) with ``seed``
    for the head and the batch order, all epochs, then ID test and every OOD view."""
    from equiray_pipelines.ftp.task import build_model, evaluate
    from equiray_pipelines.ftp.trial import fine_tuner

    torch.set_num_threads(1)
    model = build_model(spec, state, new_head=cfg.task.new_head, seed=seed)
    tuner, (x, y) = fine_tuner(cfg, model, point, task.train)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        tuner.epoch(x, y, generator=gen)
    test = evaluate(model, task.test_views(), task.labels)
    ood = {k: v for k, v in test.items() if k != "id_test"}
    return {"id": test["id_test"], "ood": sum(ood.values()) / len(ood), "views": ood,
            "seconds": time.perf_counter() - start}


def tune_method(cfg, method: str, trials: int):
    """The pipeline's search over ``method`` alone: its champion's point and the search's result."""
    from equiray_pipelines.ftp import run_tune
    from equiray_pipelines._common import TrackingConfig
    from equiray_pipelines.tracking import config_hash

    one = dataclasses.replace(
        cfg, space=dataclasses.replace(cfg.space, methods=(method,)),
        search=dataclasses.replace(cfg.search, num_samples=trials, seed=0),
        tracking=TrackingConfig("equiray-bench-ftp", None, f"bench-ftp-{method}", "champion"))
    # the search's folder is named by its config: another config (a new range, a new task) is another search
    one = dataclasses.replace(one, name=f"bench-ftp-{method}-{trials}-{config_hash(one)[:8]}")
    result = run_tune(one, reuse=True)
    return result.champion.params, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ftp.yaml", help="the task, search space and training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--methods", default="finetune,l2sp,ftp,tpgm,spd")
    parser.add_argument("--trials", type=int, default=8, help="search trials per method (the same for each)")
    parser.add_argument("--seeds", type=int, default=10, help="training seeds per tuned method (1..N)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.seeds < 2:
        parser.error("--trials >= 1 and --seeds >= 2 (an interval needs two seeds)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")

    import ray

    from equiray.config import load_config
    from equiray.stats import compare, mean_interval
    from equiray_pipelines import tracking
    from equiray_pipelines.ftp import FTPConfig
    from equiray_pipelines.ftp.config import METHOD_ORDER
    from equiray_pipelines.ftp.task import load_task

    cfg = load_config(FTPConfig, args.config, overrides=args.set)
    methods = [m for m in METHOD_ORDER if m in args.methods.split(",")]
    if not methods:
        parser.error(f"--methods: choose from {','.join(METHOD_ORDER)}")
    started = time.perf_counter()
    tuned = {}
    for m in methods:
        point, result = tune_method(cfg, m, args.trials)
        tuned[m] = point
        print(f"[bench] {m}: tuned point {point} (ID val {result.champion.val_accuracy:.4f}), "
              f"{(time.perf_counter() - started) / 60:.1f} min so far", flush=True)

    backbone, spec = tracking.load_model(cfg.backbone)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    task = load_task(cfg)
    remote, shared = ray.remote(num_cpus=1)(train_seed), ray.put(task)
    refs = {(m, s): remote.remote(cfg, shared, spec, state, tuned[m], s)
            for s in range(1, args.seeds + 1) for m in methods}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for (m, s), ref in refs.items():
        runs[m].append(ray.get(ref))
        print(f"[bench] {m} seed {s}: ID {runs[m][-1]['id']:.4f} OOD {runs[m][-1]['ood']:.4f}", flush=True)

    def cell(values):
        iv = mean_interval([100 * v for v in values])
        return f"{iv.mean:.2f} +- {iv.half_width:.2f}"

    def paired(a: str, b: str, key: str) -> str:  # method a minus method b, seed by seed, in points
        diff, verdict = compare([100 * r[key] for r in runs[a]], [100 * r[key] for r in runs[b]])
        return f"{diff.mean:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}] ({verdict})"

    lines = [
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_ftp_accuracy.py --config {args.config} "
        f"--trials {args.trials} --seeds {args.seeds}" + "".join(f" --set {s}" for s in args.set) + "`. "
        f"Task: target view {cfg.task.target_view}, {cfg.task.train_images} labelled target images, "
        f"{cfg.train.epochs} epochs, base {cfg.train.base}; OOD: {', '.join(cfg.task.ood_views)}; "
        f"{cfg.task.test_images} test images. Each method tuned by the pipeline's search ({args.trials} trials, "
        f"{cfg.search.searcher}, {cfg.search.scheduler}, selected on ID validation), then trained with seeds "
        f"1..{args.seeds}; "
        f"mean +- 95% interval over the seeds (Student t); FTP vs each method paired by seed. "
        f"{(time.perf_counter() - started) / 60:.0f} minutes in all.", "",
        "| method | tuned point | ID test acc (%) | OOD mean acc (%) | FTP - method, ID (points) | "
        "FTP - method, OOD (points) |",
        "|---|---|---|---|---|---|"]
    for m in methods:
        point = ", ".join(f"{k} {v:.3g}" for k, v in tuned[m].items() if k != "method")
        row = [m, point, cell([r["id"] for r in runs[m]]), cell([r["ood"] for r in runs[m]])]
        row += ["-", "-"] if m == "ftp" or "ftp" not in runs else [paired("ftp", m, "id"), paired("ftp", m, "ood")]
        lines.append("| " + " | ".join(row) + " |")
    if "spd" in runs:
        lines += ["", "SPD against each method, paired by seed (points; the interval decides):", "",
                  "| method | SPD - method, ID | SPD - method, OOD |", "|---|---|---|"]
        lines += [f"| {m} | {paired('spd', m, 'id')} | {paired('spd', m, 'ood')} |" for m in methods if m != "spd"]
    views = list(runs[methods[0]][0]["views"])
    lines += ["", "OOD accuracy by view (mean over the seeds, %):", "",
              "| method | " + " | ".join(views) + " |", "|---|" + "---|" * len(views)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{100 * sum(r['views'][v] for r in runs[m]) / len(runs[m]):.2f}" for v in views) + " |")
    emit("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
