"""The main job: every stage at demo scale on one machine, ending in a report.

Stages: (1) prepare Fashion-MNIST as Parquet shards; (2) pretrain a backbone with Ray Train, register it as
``equiray-backbone@pretrained`` and evaluate it on upright, C4-rotated and corrupted views; (3) augmentation
ensembles on Ray Train, OSP/KL vs ensemble size; (4) distil the ensemble into one student; (5) canonicalization
variants around the backbone as Ray Tune trials; (6) a robust fine-tuning search (FTP, TPGM, L2-SP) on Ray Tune;
(7) Monomial-NFN: a zoo of small CNNs trained on Ray tasks, metanetworks that read their accuracy off the weights,
and the same for the ensemble's members, used to leave the weakest out of the average; (8) serve: the registered
ensemble behind Ray Serve, a few real HTTP requests (upright and rotated test images), the answers printed, the
endpoint shut down.

    equiray demo [--config configs/demo.yaml] [--set pretrain.train.epochs=1]
"""
from __future__ import annotations

import logging
import os
import time

import torch
from dataclasses import dataclass
from pathlib import Path

from pipelines._common import TrackingConfig
from pipelines.canon import CanonConfig
from pipelines.distill import DistillConfig
from pipelines.ftp import FTPConfig, SearchConfig as FTPSearch, FTPTrain
from pipelines.ensemble import EnsembleConfig
from pipelines.nfn import NFNTrainConfig, ZooConfig
from pipelines.pretrain import DataConfig, PretrainConfig, TrainConfig
from pipelines.serve import ServeConfig

log = logging.getLogger(__name__)


STAGES = ("pretrain", "ensemble", "distill", "canon", "ftp", "nfn", "serve")


@dataclass(frozen=True)
class NFNDemo:
    """The demo's Monomial-NFN stage: a small Small-CNN-Zoo-style zoo and its metanetworks, then a zoo of the
    ensemble's members, a metanetwork over them, and ``--select-by nfn`` on the ensemble."""

    zoo: ZooConfig = ZooConfig(data=DataConfig(max_train=3000, max_eval=1000), nets=96, nets_per_task=8, epochs=1,
                               out="data/zoo-demo")
    train: NFNTrainConfig = NFNTrainConfig(zoo="data/zoo-demo", epochs=100)
    member_zoo: str = "data/member-zoo-demo"
    members: NFNTrainConfig = NFNTrainConfig(zoo="data/member-zoo-demo", epochs=60, zoos=("plain",),
                                             metanetworks={"monomial-nfn": {"hidden_channels": 16}},
                                             tracking=TrackingConfig(experiment="equiray-nfn",
                                                                     registered_model="equiray-nfn-members",
                                                                     alias="champion"))
    drop_fraction: float = 0.25


@dataclass(frozen=True)
class DemoConfig:
    pretrain: PretrainConfig = PretrainConfig(train=TrainConfig(epochs=3), data=DataConfig())
    ensemble: EnsembleConfig = EnsembleConfig()
    distill: DistillConfig = DistillConfig()
    canon: CanonConfig = CanonConfig()
    ftp: FTPConfig = FTPConfig(search=FTPSearch(num_samples=10, grace_period=2), train=FTPTrain(epochs=6))
    nfn: NFNDemo = NFNDemo()
    serve: ServeConfig = ServeConfig(port=0)  # any free port: the demo's endpoint lives only for its requests
    serve_images: int = 4  # test images sent upright and rotated by 90, 180, 270 degrees
    stages: tuple[str, ...] = STAGES
    reuse: bool = True  # take a stage's registered result when the same config produced it (--fresh: redo all)

    def __post_init__(self):
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"stages: unknown {sorted(unknown)}; choose from {', '.join(STAGES)}")


def _banner(step: int, total: int, text: str) -> None:
    print(f"\n=== [{step}/{total}] {text}", flush=True)


def run(cfg: DemoConfig, *, report_dir: str | os.PathLike = "reports") -> dict:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = ["data", *cfg.stages]
    total = len(stages)
    _banner(1, total, f"data: {cfg.pretrain.data.source} -> {cfg.pretrain.data.dir} (Parquet shards)")
    meta = cfg.pretrain.data.prepare()
    print("    " + ", ".join(f"{s}: {n}" for s, n in meta["rows"].items()) + f" images {tuple(meta['shape'])}")

    out: dict = {}
    if "pretrain" in cfg.stages:
        _banner(stages.index("pretrain") + 1, total, f"pretrain: {cfg.pretrain.model.name} on upright data with "
                f"Ray Train, {cfg.pretrain.train.epochs} epochs")
        from pipelines import pretrain

        out["pretrain"] = pre = pretrain.run(cfg.pretrain, report_dir=report_dir, reuse=cfg.reuse)
        if pre["reused"]:
            print(f"    reused {pre['registered']} version {pre['version']} (same config; --fresh retrains)")
        print("\n" + _results_table(pre, cfg.pretrain.eval.group))
    if "ensemble" in cfg.stages:
        e = cfg.ensemble
        _banner(stages.index("ensemble") + 1, total, f"ensembles: {len(e.settings)} settings x {e.members} members "
                f"on Ray Train, then OSP/KL vs ensemble size under {e.group}")
        from pipelines import ensemble

        out["ensemble"] = trained = ensemble.run_train(e, reuse=cfg.reuse)
        if trained["reused"]:
            print(f"    reused {trained['registered']} version {trained['version']} (same config)")
        out["ensemble_eval"] = ev = ensemble.run_eval(e, run_id=trained["run_id"], report_dir=report_dir,
                                                      ensembles=trained.get("ensembles"))
        print("\n" + ev["table"] + "\n" + "\n".join(ev["verdict"]))
    if "distill" in cfg.stages:
        _banner(stages.index("distill") + 1, total, f"distill: {cfg.distill.teacher} -> one "
                f"{cfg.distill.student.name} student")
        from pipelines import distill

        out["distill"] = dist = distill.run(cfg.distill, report_dir=report_dir, reuse=cfg.reuse)
        print("\n" + dist["table"])
    if "canon" in cfg.stages:
        c = cfg.canon
        _banner(stages.index("canon") + 1, total, f"canonicalization: {len(c.variants())} variants around "
                f"{c.backbone} as Ray Tune trials, judged on {c.eval_group}-rotated test sets")
        from pipelines import canon

        out["canon"] = can = canon.run_sweep(c, report_dir=report_dir, reuse=cfg.reuse)
        if can["reused"]:
            print(f"    reused {can['registered']} version {can['version']} (same config)")
        print("\n" + can["table"] + "\n" + "\n".join(can["verdict"]))
    if "ftp" in cfg.stages:
        f = cfg.ftp
        _banner(stages.index("ftp") + 1, total, f"robust fine-tuning: {f.search.num_samples} Ray Tune trials over "
                f"{', '.join(f.space.methods)} ({f.search.searcher}, {f.search.scheduler}), target {f.task.target_view}")
        from pipelines import ftp

        out["ftp"] = ft = ftp.run_tune(f, report_dir=report_dir, reuse=cfg.reuse)
        if ft["reused"]:
            print(f"    reused {ft['registered']} version {ft['version']} (same config)")
        print("\n" + ft["table"] + "\n" + "\n".join(ft["verdict"]))
    if "nfn" in cfg.stages:
        _banner(stages.index("nfn") + 1, total, f"Monomial-NFN: a zoo of {cfg.nfn.zoo.nets} small CNNs on Ray tasks, "
                "metanetworks predicting their accuracy from weights; then the ensemble's members")
        out["nfn"] = _nfn_stage(cfg, out, report_dir)
    if "serve" in cfg.stages:
        _banner(stages.index("serve") + 1, total, f"serve: {cfg.serve.model} behind Ray Serve, {cfg.serve_images} "
                "test images upright and rotated, sent over HTTP")
        out["serve"] = srv = serve_stage(cfg.serve, cfg.pretrain.data.dir, cfg.serve_images)
        print(f"    {srv['url']}: {srv['requests']} requests in {srv['seconds']:.1f} s, then shut down; "
              f"version {srv['version']}, test 0 as a raw PNG body -> {srv['raw_png_label']}")
        print("\n" + srv["table"])
    elapsed = time.perf_counter() - t0
    report = write_report(report_dir / "demo.md", cfg, meta, out, elapsed)
    tracking = next(iter(out.values()))["tracking_uri"] if out else ""
    print(f"\nreport:   {report.resolve()}")
    print(f"mlflow:   {tracking}  (browse: .venv/bin/mlflow ui --backend-store-uri {tracking})")
    for key in STAGES:
        if key in out and key != "serve":
            print(f"model:    {out[key]['registered']} (version {out[key]['version']})")
    print(f"finished in {elapsed / 60:.1f} min")
    return {**out, "report": str(report), "seconds": elapsed}


def _nfn_stage(cfg: DemoConfig, out: dict, report_dir: Path) -> dict:
    """Zoo (reused when the same zoo config wrote it), metanetworks, member zoo, selection."""
    import dataclasses
    import json

    from equiray.config import to_dict
    from pipelines import ensemble, nfn

    n = cfg.nfn
    zoo_json = Path(n.zoo.out) / "zoo.json"
    same = zoo_json.exists() and json.loads(zoo_json.read_text()).get("config") == to_dict(n.zoo)
    if same and cfg.reuse:
        print(f"    reused the zoo in {n.zoo.out} (same config)")
    else:
        z = nfn.run_zoo(dataclasses.replace(n.zoo, overwrite=True))
        print(f"    {z['nets']} nets in {z['seconds']:.0f} s -> {z['out']}; test accuracy "
              f"{z['test_accuracy']['min'] * 100:.0f}-{z['test_accuracy']['max'] * 100:.0f}%")
    res = nfn.run_train(n.train, report_dir=report_dir, reuse=cfg.reuse)
    print("\n" + res["table"] + "\n" + "\n".join(res["verdict"]))
    result = {**res, "zoo_nets": json.loads(zoo_json.read_text())["nets"]}
    if "ensemble" not in out:
        return result
    run_id = out["ensemble"]["run_id"]
    member_json = Path(n.member_zoo) / "zoo.json"
    source = f"ensemble train run {run_id}"
    if not (cfg.reuse and member_json.exists() and json.loads(member_json.read_text()).get("source") == source):
        nfn.run_zoo(dataclasses.replace(n.zoo, from_ensemble=run_id, out=n.member_zoo, overwrite=True,
                                        ensemble_experiment=cfg.ensemble.tracking.experiment))
    members = nfn.run_train(dataclasses.replace(n.members, zoo=n.member_zoo), report_dir=report_dir / "members",
                            reuse=cfg.reuse)
    print("\n" + members["table"])
    e = cfg.ensemble
    sel = ensemble.run_select(dataclasses.replace(e, eval=dataclasses.replace(
        e.eval, select_by="nfn", drop_fraction=n.drop_fraction, nfn_model=members["registered"])),
        run_id=run_id, ensembles=out["ensemble"].get("ensembles"), report_dir=report_dir)
    print("\n" + sel["table"] + "\n" + "\n".join(sel["verdict"]))
    return {**result, "members": members, "selection": sel}


def serve_stage(cfg: ServeConfig, data_dir: str, n: int) -> dict:
    """Start the endpoint, send real requests (upright images as one multipart request, each rotated view as
    JSON pixel arrays, one raw PNG body), tabulate the answers, shut the endpoint down."""
    import io

    import numpy as np
    import requests
    from PIL import Image
    from ray import serve

    from equiray.data import read_meta, read_split
    from pipelines import _tracking, serve as serving

    x, y = read_split(data_dir, "test", limit=n)  # (n, C, H, W) in [0, 1]
    names = read_meta(data_dir)["classes"]
    import ray

    t0 = time.perf_counter()
    shared = ray.is_initialized() and serving._serve_running() is not None  # other apps on this Serve: keep them
    ep = serving.deploy(cfg)
    try:
        url = ep["url"] + "/v1/predict"

        def png(img):  # (C, H, W) in [0, 1] -> PNG bytes
            buf = io.BytesIO()
            Image.fromarray((img.squeeze(0) * 255).round().byte().numpy()).save(buf, "PNG")
            return buf.getvalue()

        answers = {}
        res = requests.post(url, files=[("files", (f"test-{i}.png", png(img), "image/png")) for i, img in enumerate(x)],
                            timeout=120)
        res.raise_for_status()
        answers[0] = res.json()["predictions"]
        for k in (1, 2, 3):
            rotated = torch.rot90(x, k, dims=(-2, -1))
            res = requests.post(url, json={"instances": rotated.squeeze(1).tolist()}, timeout=120)
            res.raise_for_status()
            answers[90 * k] = res.json()["predictions"]
        single = requests.post(url, data=png(x[0]), headers={"Content-Type": "image/png"}, timeout=120)
        single.raise_for_status()
        info = requests.get(ep["url"] + "/v1/model", timeout=60).json()
    finally:
        serve.delete(cfg.app_name) if shared else serve.shutdown()
    seconds = time.perf_counter() - t0
    extra = "disagreement" if "disagreement" in answers[0][0] else "group_element" if "group_element" in answers[0][0] else None
    head = ["image", "true label", *[f"{deg} deg" for deg in answers]] + ([f"{extra} (0 / 90 / 180 / 270)"] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(len(y)):
        cells = [f"test {i}", names[int(y[i])]]
        cells += [f"{a[i]['label']} ({a[i]['probabilities'][a[i]['label']] * 100:.0f}%)" for a in answers.values()]
        if extra == "disagreement":
            cells.append(" / ".join(f"{a[i]['disagreement']:.2f}" for a in answers.values()))
        elif extra == "group_element":
            cells.append(" / ".join(f"{a[i]['group_element']['rotation_deg']:g}" for a in answers.values()))
        lines.append("| " + " | ".join(cells) + " |")
    return {"url": ep["url"], "model": ep["model"], "version": ep["version"], "table": "\n".join(lines),
            "requests": 6, "seconds": seconds, "info": info, "tracking_uri": _tracking.tracking_uri(),
            "raw_png_label": single.json()["predictions"][0]["label"]}


def _results_table(pre: dict, group: str) -> str:
    acc = pre["accuracy"]
    rot = [v for v in acc if v.startswith("rot:")]
    other = [v for v in acc if v != "upright" and not v.startswith("rot:")]
    rows = [("upright test", acc["upright"]),
            (f"{group}-avg (upright + {len(rot)} rotations)", pre["summary"][f"test_{group}_avg_accuracy"])]
    rows += [(f"rotated {v.split(':')[-1]} x {360 // (len(rot) + 1)} deg", acc[v]) for v in rot]
    rows += [(f"corrupted: {v}", acc[v]) for v in other]
    width = max(len(r[0]) for r in rows)
    lines = ["| pretrained backbone".ljust(width + 2) + " | accuracy |", "|" + "-" * (width + 2) + "|----------|"]
    lines += [f"| {name.ljust(width)} | {value * 100:7.2f}% |" for name, value in rows]
    return "\n".join(lines)


def write_report(path: Path, cfg: DemoConfig, meta: dict, out: dict, seconds: float) -> Path:
    """A Markdown report with the tables and the plots (written next to it)."""
    tracking = next(iter(out.values()))["tracking_uri"] if out else ""
    parts = [f"""# equiray demo report

Generated {time.strftime('%Y-%m-%d %H:%M:%S')} in {seconds / 60:.1f} min. MLflow: `{tracking}`.

## 1. Data
`{meta['source']}` as Parquet shards in `{cfg.pretrain.data.dir}`: {', '.join(f"{s} {n}" for s, n in meta['rows'].items())}
images of shape {tuple(meta['shape'])} (H, W, C), {meta['num_classes']} classes.
"""]
    if "pretrain" in out:
        pre = out["pretrain"]
        epochs = "\n".join(
            f"| {int(r['epoch']) + 1} | {r['train_loss']:.4f} | {r['train_accuracy'] * 100:.2f}% | "
            f"{r['val_accuracy'] * 100:.2f}% | {r['epoch_seconds']:.0f} |" for r in pre["epochs"])
        plots = "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in pre["plots"])
        parts.append(f"""## Pretrained backbone (`{pre['registered']}`, version {pre['version']})
`{cfg.pretrain.model.name}` trained on upright images with Ray Train
({cfg.pretrain.scaling.num_workers} worker(s), {cfg.pretrain.train.epochs} epochs), run `{pre['run_name']}`.

| epoch | train loss | train acc | val acc | seconds |
|---|---|---|---|---|
{epochs}

{_results_table(pre, cfg.pretrain.eval.group)}

The backbone is accurate on upright images and loses much of it on rotated ones: that gap is what the
rest of equiray closes.

{plots}
""")
    if "ensemble" in out:
        e, tr, ev = cfg.ensemble, out["ensemble"], out["ensemble_eval"]
        parts.append(f"""## Augmentation ensembles (`{tr['registered']}`, version {tr['version']})
{len(e.settings)} settings x {e.members} members of `{e.member.name}` ({e.member.kwargs}), {e.train.epochs} epochs on
{e.data.max_train or 'all'} training images at {e.data.resize or meta['shape'][0]}px, group {e.group}; run
`{tr['run_id']}`. Invariance of the ensemble mean vs ensemble size (bootstrap, {e.eval.repeats} subsets per size),
in distribution (test set) and off-manifold ({e.eval.off_manifold}):

![ensemble_invariance](ensemble_invariance.png)

{ev['table']}

{chr(10).join(ev['verdict'])}
""")
    if "distill" in out:
        d = out["distill"]
        parts.append(f"""## Distilled student (`{d['registered']}`, version {d['version']})
One `{cfg.distill.student.name}` trained to match the ensemble mean on {cfg.distill.group or cfg.ensemble.group}-
group-transformed inputs; the same measures, and the serving cost (the student is {d['speedup']:.1f}x cheaper):

{d['table']}
""")
    if "canon" in out:
        c, can = cfg.canon, out["canon"]
        parts.append(f"""## Canonicalization adapters (`{can['registered']}`, version {can['version']})
{len(can['rows'])} variants around `{c.backbone}`, each a Ray Tune trial and an MLflow run (sweep run
`{can['run_id']}`): fine-tuned {c.train.epochs} epochs on {c.data.max_train or 'all'} upright training images;
accuracy on the upright test set and averaged over its {c.eval_group} rotations ({c.data.max_eval or 'all'} images);
identity rate = share of upright test images the canonicalizer leaves as they are; ms per image on a batch of
{c.latency_batch}, every model timed in the same process. Champion: **{can['champion']}**.

![canon_variants](canon_variants.png)

{can['table']}

{chr(10).join(can['verdict'])}
""")
    if "ftp" in out:
        f, ft = cfg.ftp, out["ftp"]
        parts.append(f"""## Robust fine-tuning (`{ft['registered']}`, version {ft['version']})
`{f.backbone}` fine-tuned on {f.task.train_images} labelled `{f.task.target_view}` images (the ID target domain)
with a new head; {len(ft['rows'])} Ray Tune trials over {', '.join(f.space.methods)}, up to {f.train.epochs} epochs,
ASHA early stopping, selected on ID validation accuracy only (search run `{ft['run_id']}`). OOD: the test set
under {', '.join(f.task.ood_views)}. Champion: **{ft['champion']['method']}** (ID val
{ft['champion']['val_accuracy'] * 100:.1f}%).

![ftp_trials](ftp_trials.png)

{ft['table']}

{chr(10).join(ft['verdict'])}
""")
    if "nfn" in out:
        nf, n = out["nfn"], cfg.nfn
        parts.append(f"""## Monomial-NFN (`{nf['registered']}`, version {nf['version']})
A zoo of {nf['zoo_nets']} Small-CNN-Zoo nets (4,970 parameters; optimizer, learning rate, L2, dropout, init scale and
training fraction drawn per net), trained {n.zoo.epochs} epoch(s) on {n.zoo.data.max_train} images as vectorized Ray
tasks. Metanetworks predict each net's test accuracy from its weights; Kendall tau on the
{round(nf['zoo_nets'] * n.train.test_fraction)} held-out nets, on the plain zoo and on the same zoo with every hidden
unit rescaled by a random factor in [1e-4, 1e4] (the same functions):

![nfn_scatter](nfn_scatter.png)

{nf['table']}

{chr(10).join(nf['verdict'])}
""")
        if "members" in nf:
            parts.append(f"""### Reading the ensemble's members
The ensemble's members as a zoo (accuracy on the validation split), a sign-flip Monomial-NFN over them
(`{nf['members']['registered']}`), and `ensemble eval --select-by nfn`: the {int(n.drop_fraction * 100)}% of members
predicted weakest are left out of the average (test set; random subsets of the same size as the control):

{nf['members']['table']}

{nf['selection']['table']}

{chr(10).join(nf['selection']['verdict'])}
""")
    if "serve" in out:
        srv = out["serve"]
        parts.append(f"""## Online serving (`{srv['model']}`, version {srv['version']})
Ray Serve hosted the model at `{srv['url']}` for {srv['seconds']:.0f} s: {srv['requests']} HTTP requests (the
upright test images as multipart PNG files, each rotation as JSON pixel arrays, one raw PNG body), then shut
down. `equiray serve run --model {srv['model']}` keeps it running (README, "Serve a model").

{srv['table']}
""")
    tmp = path.with_suffix(".md.partial")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("demo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
