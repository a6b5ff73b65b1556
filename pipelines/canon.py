"""Canonicalization variants on Ray Tune: a grid of adapters around the pretrained backbone, one trial each.

``equiray canon sweep --config configs/canon.yaml`` starts from ``equiray-backbone@pretrained`` and trains
every variant of the grid (canonicalizer kind x group x prior weight x backbone frozen / fine-tuned) plus the
baselines (plain fine-tuning, fine-tuning with group augmentation). Each variant is one Ray Tune trial with its
own CPU / (fractional) GPU resources, so the grid fans out over a cluster's workers; each is one MLflow run,
nested under the sweep's run. The driver then times every model on the same batch, one after the other (timings
from concurrent trials would measure their contention), writes the table and a plot, and registers the best
variant as ``equiray-canon@champion``.

Why trials train in the Tune function rather than in a ``TorchTrainer`` per trial: in Ray 2.60 a Train V2 run
inside a Tune trial keeps its worker group when the trial is stopped (Ray issue 54305), which stalls the next
trial on a small machine; a variant is a single-process job, so the trial is the worker (one CPU or a GPU
fraction each, from ``resources``).

    python -m pipelines.canon sweep --config configs/canon.yaml
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from equiray.canon import (CanonicalizedModel, contrastive_loss, create_canonicalizer, identity_rate,
                           list_canonicalizers, prior_loss)
from equiray.config import to_dict
from equiray.errors import ConfigError
from equiray.groups import get_group
from pipelines._common import DataConfig, ResourcesConfig, TrackingConfig, resize

log = logging.getLogger(__name__)

BACKBONE_MODES = ("finetune", "frozen")
BASELINES = ("vanilla", "augment")


@dataclass(frozen=True)
class GridConfig:
    """The variant grid: every combination is one trial."""

    kind: tuple[str, ...] = ("equivariant", "optimized")
    group: tuple[str, ...] = ("C8",)
    prior_weight: tuple[float, ...] = (0.0, 100.0)
    backbone: tuple[str, ...] = ("finetune",)  # finetune | frozen

    def __post_init__(self):
        for k in self.kind:
            if k not in list_canonicalizers():
                raise ConfigError(f"grid.kind: unknown canonicalizer {k!r}; choose from {list_canonicalizers()}")
        for g in self.group:
            get_group(g)
        for b in self.backbone:
            if b not in BACKBONE_MODES:
                raise ConfigError(f"grid.backbone: {b!r} is not one of {BACKBONE_MODES}")
        if any(w < 0 for w in self.prior_weight):
            raise ConfigError("grid.prior_weight: weights must be >= 0")


@dataclass(frozen=True)
class CanonTrain:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3  # backbone (fine-tuned variants and baselines)
    canon_lr: float = 3e-2  # canonicalizer
    weight_decay: float = 1e-4
    beta: float = 1.0  # softmax temperature of the straight-through choice
    prior_beta: float = 1.0  # scale of the scores inside the prior's cross-entropy (1: the papers' plain CE)
    contrastive_weight: float = 1.0  # optimized canonicalizer only
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.canon_lr <= 0:
            raise ConfigError("train: epochs, batch_size >= 1; lr, canon_lr > 0")


@dataclass(frozen=True)
class CanonConfig:
    backbone: str = "models:/equiray-backbone@pretrained"
    data: DataConfig = DataConfig(max_train=6000, max_eval=2000)
    grid: GridConfig = GridConfig()
    baselines: tuple[str, ...] = BASELINES
    # keyword arguments of each canonicalizer kind (see equiray.canon)
    canonicalizers: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "equivariant": {"channels": 8, "layers": 2, "kernel_size": 5, "input_size": 9, "batch_norm": True,
                        "dropout": 0.5},
        "optimized": {"network": "small_cnn", "network_kwargs": {"width": 4}, "embed_dim": 16, "input_size": 7},
    })
    train: CanonTrain = CanonTrain()
    eval_group: str = "C8"  # the Cn-avg accuracy: mean over the n rotated copies of the test set
    select: str = "cn_avg_accuracy"  # the metric that picks the champion
    latency_batch: int = 256
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig("equiray-canon", None, "equiray-canon", "champion")
    storage_path: str = "runs"

    def __post_init__(self):
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"baselines: {b!r} is not one of {BASELINES}")
        for k in self.canonicalizers:
            if k not in list_canonicalizers():
                raise ConfigError(f"canonicalizers: unknown kind {k!r}; choose from {list_canonicalizers()}")
        get_group(self.eval_group)
        if self.select not in ("cn_avg_accuracy", "upright_accuracy"):
            raise ConfigError("select: cn_avg_accuracy or upright_accuracy")

    def variants(self) -> list[dict]:
        """Every trial's variant: the baselines first, then the grid."""
        out = []
        for b in self.baselines:
            group = self.eval_group  # augment with the group the variants are judged on
            out.append({"name": "fine-tune" if b == "vanilla" else f"fine-tune + {group} aug", "kind": "none",
                        "group": group, "augment": b == "augment", "prior_weight": 0.0, "backbone": "finetune"})
        for kind in self.grid.kind:
            for group in self.grid.group:
                for w in self.grid.prior_weight:
                    for mode in self.grid.backbone:
                        prior = f"prior {w:g}" if w else "no prior"
                        out.append({"name": f"{kind} {group}, {prior}, {mode}", "kind": kind, "group": group,
                                    "augment": False, "prior_weight": float(w), "backbone": mode})
        return out


# ----------------------------------------------------------------------------------------- one variant
def build_variant(variant: dict, backbone_spec: dict, backbone_state: dict | None, canon_kwargs: dict,
                  beta: float, *, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The variant's model (backbone weights loaded, canonicalizer initialized from ``seed``) and the spec that
    rebuilds it with ``create_model``."""
    from equiray.models import create_model

    torch.manual_seed(seed)
    backbone = create_model(backbone_spec["name"], in_chans=backbone_spec["in_chans"],
                            num_classes=backbone_spec["num_classes"], **backbone_spec.get("kwargs", {}))
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    base = {k: backbone_spec[k] for k in ("in_chans", "num_classes", "classes", "input_shape", "data")
            if k in backbone_spec}
    if variant["kind"] == "none":
        return backbone, {**base, "name": backbone_spec["name"], "kwargs": dict(backbone_spec.get("kwargs", {}))}
    kwargs = dict(canon_kwargs.get(variant["kind"], {}))
    canon = create_canonicalizer(variant["kind"], variant["group"], in_chans=backbone_spec["in_chans"], **kwargs)
    model = CanonicalizedModel(backbone, canon, beta=beta)
    spec = {**base, "name": "canonicalized", "kwargs": {
        "backbone": backbone_spec["name"], "backbone_kwargs": dict(backbone_spec.get("kwargs", {})),
        "canonicalizer": variant["kind"], "canonicalizer_kwargs": kwargs, "group": variant["group"], "beta": beta}}
    return model, spec


def train_variant(model: torch.nn.Module, variant: dict, x: torch.Tensor, y: torch.Tensor, t: dict, *,
                  device: torch.device | str = "cpu", on_epoch=None) -> list[dict]:
    """Train one variant: task loss, plus ``prior_weight`` x the canonicalization prior (the training images are
    upright), plus the contrastive term for the optimized canonicalizer. Returns per-epoch metrics."""
    gen = torch.Generator().manual_seed(t["seed"])
    torch.manual_seed(t["seed"])
    model.to(device)
    canon = isinstance(model, CanonicalizedModel)
    backbone = model.backbone if canon else model
    frozen = variant["backbone"] == "frozen"
    for p in backbone.parameters():
        p.requires_grad_(not frozen)
    groups = []
    if not frozen:
        groups.append({"params": list(backbone.parameters()), "lr": t["lr"]})
    if canon:
        groups.append({"params": list(model.canonicalizer.parameters()), "lr": t["canon_lr"]})
    opt = torch.optim.AdamW(groups, weight_decay=t["weight_decay"])
    aug = get_group(variant["group"]) if variant["augment"] else None
    history = []
    for epoch in range(t["epochs"]):
        model.train()
        if frozen:
            backbone.eval()  # keep the pretrained BatchNorm statistics
        start = time.perf_counter()
        sums = {"loss": 0.0, "prior": 0.0, "contrastive": 0.0, "correct": 0.0, "identity": 0.0}
        n = 0
        for idx in torch.randperm(len(y), generator=gen).split(t["batch_size"]):
            xb, yb = x[idx].to(device), y[idx].to(device)
            if aug is not None:
                xb = aug.act(xb, aug.sample(len(xb), generator=gen, device=xb.device), padding="zeros")
            if canon:
                logits, info = model.forward_with_info(xb)
                loss = F.cross_entropy(logits, yb)
                prior = prior_loss(info.scores, model.group, beta=t["prior_beta"])
                if variant["prior_weight"]:
                    loss = loss + variant["prior_weight"] * prior
                contrast = contrastive_loss(info.embeddings) if info.embeddings is not None else torch.zeros(())
                if info.embeddings is not None and t["contrastive_weight"]:
                    loss = loss + t["contrastive_weight"] * contrast
                sums["prior"] += float(prior.detach()) * len(yb)
                sums["contrastive"] += float(contrast.detach()) * len(yb)
                sums["identity"] += float((info.element == model.group.identity).sum())
            else:
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += float(loss.detach()) * len(yb)
            sums["correct"] += float((logits.argmax(-1) == yb).sum())
            n += len(yb)
        row = {"epoch": epoch, "train_loss": sums["loss"] / n, "train_accuracy": sums["correct"] / n,
               "epoch_seconds": time.perf_counter() - start}
        if canon:
            row.update(train_prior_loss=sums["prior"] / n, train_identity_rate=sums["identity"] / n,
                       train_contrastive=sums["contrastive"] / n)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    model.eval()
    return history


@torch.no_grad()
def evaluate_variant(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, group: str, *,
                     batch_size: int = 512, device: torch.device | str = "cpu") -> dict:
    """Upright accuracy, the Cn-avg accuracy (mean over the n rotated copies: pad, rotate, crop), the accuracy per
    rotation, and the identity rate on upright inputs (canonicalized models)."""
    g = get_group(group)
    model.eval().to(device)
    per_element = []
    identity = []
    for e in g.elements():
        correct = 0
        for i in range(0, len(y), batch_size):
            xb = g.act(x[i:i + batch_size].to(device), e, padding="zeros")  # the rot:Cn:e views (BRIEF 3.3)
            if isinstance(model, CanonicalizedModel):
                logits, info = model.forward_with_info(xb)
                if e == g.identity:
                    identity.append(info.element.cpu())
            else:
                logits = model(xb)
            correct += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
        per_element.append(correct / len(y))
    out = {"upright_accuracy": per_element[0], "cn_avg_accuracy": sum(per_element) / len(per_element),
           **{f"accuracy_rot_{e}": a for e, a in enumerate(per_element)}}
    if identity:
        canon_group = model.group
        out["identity_rate"] = identity_rate(torch.cat(identity), canon_group)
    return out


# ----------------------------------------------------------------------------------------- the Tune trial
def _trial(config: dict, *, shared: dict) -> None:
    """One Tune trial: build, train and evaluate one variant; log it as a nested MLflow run; report to Tune."""
    import mlflow
    import ray
    import ray.tune

    from pipelines import _tracking
    from pipelines._ray import say

    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice: chosen on purpose
    variant, c = config["variant"], shared["cfg"]
    torch.set_num_threads(max(1, int(c["resources"]["cpus_per_trial"])))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    x, y, xt, yt = (ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in shared["data"])
    spec, state = shared["backbone"]
    model, model_spec = build_variant(variant, spec, state, c["canonicalizers"], c["train"]["beta"],
                                      seed=c["train"]["seed"])
    mlflow.set_tracking_uri(shared["tracking_uri"])
    client = mlflow.MlflowClient()
    run = client.create_run(shared["experiment_id"], run_name=variant["name"],
                            tags={"mlflow.parentRunId": shared["parent_run_id"], "equiray.pipeline": "canon",
                                  "equiray.variant": variant["name"]})
    run_id = run.info.run_id
    for k, v in variant.items():
        client.log_param(run_id, f"variant.{k}", v)

    def on_epoch(row):
        for k, v in row.items():
            if k != "epoch":
                client.log_metric(run_id, k, float(v), step=row["epoch"])
        say(f"[canon] {variant['name']}: epoch {row['epoch'] + 1}/{c['train']['epochs']}  loss "
            f"{row['train_loss']:.3f}  acc {row['train_accuracy']:.3f}" +
            (f"  identity {row['train_identity_rate']:.2f}" if "train_identity_rate" in row else "") +
            f"  ({row['epoch_seconds']:.0f} s)")
        ray.tune.report({"epoch": row["epoch"], "train_loss": row["train_loss"]})

    try:
        train_variant(model, variant, x, y, c["train"], device=device, on_epoch=on_epoch)
        metrics = evaluate_variant(model, xt, yt, c["eval_group"], device=device)
        for k, v in metrics.items():
            client.log_metric(run_id, k, float(v))
        with mlflow.start_run(run_id=run_id):
            model_uri = _tracking.log_model(model, model_spec)
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    ray.tune.report({**metrics, "run_id": run_id, "model_uri": model_uri, "done": True})


# ----------------------------------------------------------------------------------------- driver
def _load_data(cfg: CanonConfig) -> tuple[torch.Tensor, ...]:
    from equiray.data import read_split

    cfg.data.prepare()
    x, y = read_split(cfg.data.dir, "train", limit=cfg.data.max_train)
    xt, yt = read_split(cfg.data.dir, "test", limit=cfg.data.max_eval)
    return resize(x, cfg.data.resize), y, resize(xt, cfg.data.resize), yt


def run_sweep(cfg: CanonConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Fan the variants out as Tune trials, time each model, tabulate, plot, register the champion."""
    import mlflow
    import ray
    from ray import tune

    from pipelines import _tracking
    from pipelines._ray import cluster_summary, init_ray

    t0 = time.perf_counter()
    uri = _tracking.tracking_uri()
    experiment_id = _tracking.setup(cfg.tracking.experiment, uri)
    backbone, spec = _tracking.load_model(cfg.backbone)  # a clear error if it is not registered
    cfg_hash = _tracking.config_hash({"config": to_dict(cfg), "backbone": _tracking.registry_version(cfg.backbone)})
    if reuse:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias, config_hash_value=cfg_hash)
        if mv is not None:
            log.info("reusing %s@%s (version %s): made by this same config", cfg.tracking.registered_model,
                     cfg.tracking.alias, mv.version)
            return _result_from_registry(cfg, mv, uri, report_dir)
    data = _load_data(cfg)
    if data[0].shape[1] != spec["in_chans"]:
        raise ConfigError(f"data has {data[0].shape[1]} channels but {cfg.backbone} takes {spec['in_chans']}")
    init_ray()
    log.info("Ray: %s", cluster_summary())
    variants = cfg.variants()
    run_name = cfg.tracking.run_name or f"canon-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    with mlflow.start_run(run_name=run_name) as parent:
        _tracking.log_config(cfg)
        mlflow.set_tags({"equiray.pipeline": "canon", "equiray.backbone": cfg.backbone})
        shared = {"cfg": to_dict(cfg), "data": [ray.put(t) for t in data],
                  "backbone": (spec, {k: v.cpu() for k, v in backbone.state_dict().items()}),
                  "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id}
        resources = {"cpu": cfg.resources.cpus_per_trial}
        if cfg.resources.gpus_per_trial:
            resources["gpu"] = cfg.resources.gpus_per_trial
        trainable = tune.with_resources(tune.with_parameters(_trial, shared=shared), resources)
        tuner = tune.Tuner(
            trainable, param_space={"variant": tune.grid_search(variants)},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.resources.max_concurrent or None),
            run_config=tune.RunConfig(name=run_name, storage_path=str(Path(cfg.storage_path).resolve()),
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=1)))
        grid = tuner.fit()
        errors = [r.error for r in grid if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(variants)} variants failed; first: {errors[0]}")
        rows = []
        for r in grid:
            rows.append({**r.config["variant"], **{k: v for k, v in r.metrics.items()
                                                   if k.endswith("accuracy") or k.startswith("accuracy_rot")
                                                   or k in ("identity_rate", "run_id", "model_uri")}})
        order = {v["name"]: i for i, v in enumerate(variants)}
        rows.sort(key=lambda r: order[r["name"]])
        _time_variants(rows, cfg, backbone, data[2])
        table = results_table(rows, cfg.eval_group)
        best = max(rows, key=lambda r: (r[cfg.select], r["upright_accuracy"]))
        plot = _plot(rows, cfg.eval_group, Path(report_dir) if report_dir else None)
        mlflow.log_artifact(str(plot), "plots")
        mlflow.log_text(table, "variants.md")
        mlflow.log_text(json.dumps(rows, indent=2), "variants.json")
        mlflow.log_metrics({"variants": len(rows), "sweep_seconds": time.perf_counter() - t0,
                            f"champion_{cfg.select}": best[cfg.select]})
        version = _tracking.register(best["model_uri"], cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"variant": best["name"], "run_id": best["run_id"],
                                           cfg.select: f"{best[cfg.select]:.4f}", "equiray.config_hash": cfg_hash,
                                           "sweep_run_id": parent.info.run_id})
    return {"run_id": parent.info.run_id, "run_name": run_name, "tracking_uri": uri, "rows": rows, "table": table,
            "verdict": verdict(rows, cfg.eval_group), "champion": best["name"], "plot": str(plot),
            "version": version, "reused": False, "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"}


def _time_variants(rows: list[dict], cfg: CanonConfig, bare: torch.nn.Module, x_test: torch.Tensor, *,
                   rounds: int = 25) -> None:
    """ms per image of every variant and of the bare backbone on the same batch, in this one process.

    The models take turns round by round, the bare backbone first and last in every round; a variant's overhead
    is the median over rounds of its time over the bare backbone's in that round, so a drift in machine load
    (Ray winding the trials down, another process) hits both sides of every ratio alike."""
    import statistics

    import mlflow

    from pipelines import _tracking

    batch = x_test[:cfg.latency_batch]
    bare = bare.eval()
    models = [bare] + [_tracking.load_model(r["model_uri"])[0] for r in rows] + [bare]
    times = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            m(batch)  # warm-up
        for _ in range(rounds):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(batch)
                times[i].append(time.perf_counter() - start)
    bare_round = [(a + b) / 2 for a, b in zip(times[0], times[-1])]
    bare_ms = 1000 * statistics.median(bare_round) / len(batch)
    client = mlflow.MlflowClient()
    for r, t in zip(rows, times[1:-1]):
        r["ms_per_image"] = 1000 * statistics.median(t) / len(batch)
        r["overhead"] = statistics.median(v / b for v, b in zip(t, bare_round)) - 1.0
        r["backbone_ms_per_image"] = bare_ms
        client.log_metric(r["run_id"], "ms_per_image", r["ms_per_image"])
        client.log_metric(r["run_id"], "overhead_vs_backbone", r["overhead"])


def results_table(rows: list[dict], group: str) -> str:
    lines = [f"| variant | upright acc | {group}-avg acc | identity rate | ms / image | overhead vs backbone |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ident = f"{r['identity_rate'] * 100:.1f}%" if r.get("identity_rate") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['upright_accuracy'] * 100:.2f}% | {r['cn_avg_accuracy'] * 100:.2f}% | "
                     f"{ident} | {r['ms_per_image']:.3f} | {r['overhead'] * 100:+.0f}% |")
    return "\n".join(lines)


def verdict(rows: list[dict], group: str) -> list[str]:
    """The papers' shape, checked on these numbers: vanilla collapses on rotated inputs, augmentation pays in
    upright accuracy, canonicalization without the prior pays in upright accuracy, with the prior keeps both."""
    by = {r["name"]: r for r in rows}
    plain = next((r for r in rows if r["kind"] == "none" and not r["augment"]), None)
    aug = next((r for r in rows if r["kind"] == "none" and r["augment"]), None)
    out = []

    def pct(v):
        return f"{v * 100:.1f}%"

    if plain:
        ok = plain["cn_avg_accuracy"] < plain["upright_accuracy"] - 0.2
        out.append(f"- Plain fine-tuning {'collapses' if ok else 'does not collapse'} on rotated inputs: "
                   f"{pct(plain['upright_accuracy'])} upright, {pct(plain['cn_avg_accuracy'])} {group}-avg.")
    if plain and aug:
        ok = aug["upright_accuracy"] < plain["upright_accuracy"]
        out.append(f"- Augmentation {'pays' if ok else 'does not pay'} in upright accuracy: "
                   f"{pct(aug['upright_accuracy'])} vs {pct(plain['upright_accuracy'])}, for "
                   f"{pct(aug['cn_avg_accuracy'])} {group}-avg.")
    for r in rows:
        if r["kind"] == "none" or not r["prior_weight"]:
            continue
        twin = by.get(r["name"].replace(f"prior {r['prior_weight']:g}", "no prior"))
        if twin is None:
            continue
        pays = twin["upright_accuracy"] < r["upright_accuracy"]
        line = (f"- {r['kind']} {r['group']} ({r['backbone']}): without the prior "
                f"{pct(twin['upright_accuracy'])} upright / {pct(twin['cn_avg_accuracy'])} {group}-avg (identity rate "
                f"{pct(twin.get('identity_rate') or 0)}); with it {pct(r['upright_accuracy'])} / "
                f"{pct(r['cn_avg_accuracy'])} (identity rate {pct(r.get('identity_rate') or 0)}): the prior "
                f"{'keeps' if pays else 'does not keep'} upright accuracy better")
        if plain:
            gap = plain["upright_accuracy"] - r["upright_accuracy"]
            line += (f"; {gap * 100:.1f} points below plain fine-tuning upright" if gap > 0.005 else
                     "; level with plain fine-tuning upright")
        if aug:
            better = r["cn_avg_accuracy"] > aug["cn_avg_accuracy"]
            line += f", {'above' if better else 'below'} augmentation on {group}-avg"
        out.append(line + ".")
    return out


def _plot(rows: list[dict], group: str, out_dir: Path | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    idx = range(len(rows))
    ax.bar([i - 0.2 for i in idx], [r["upright_accuracy"] for r in rows], 0.4, label="upright")
    ax.bar([i + 0.2 for i in idx], [r["cn_avg_accuracy"] for r in rows], 0.4, label=f"{group}-avg")
    ax.set_xticks(list(idx), [r["name"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="test accuracy", title="canonicalization variants: upright vs rotated accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = out_dir / "canon_variants.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _result_from_registry(cfg: CanonConfig, mv, uri: str, report_dir) -> dict:
    import mlflow

    from pipelines import _tracking

    parent = mv.tags["sweep_run_id"]
    rows, plot = _tracking.fetch_results(parent, "variants.json", "plots/canon_variants.png", report_dir)
    run_ = mlflow.MlflowClient().get_run(parent)
    return {"run_id": parent, "run_name": run_.info.run_name, "tracking_uri": uri, "rows": rows,
            "table": results_table(rows, cfg.eval_group), "verdict": verdict(rows, cfg.eval_group),
            "champion": mv.tags.get("variant"), "plot": str(plot),
            "version": str(mv.version), "reused": True,
            "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"}


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("canon", argv)


if __name__ == "__main__":
    raise SystemExit(main())
