"""``equiray nfn zoo``: the zoo trained on Ray tasks (or an ensemble's members read back), written as Parquet
shards; and a zoo read back as metanetwork features (:func:`zoo_features`, :func:`scaled_zoo`, :func:`split_nets`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiray.config import to_dict
from equiray.errors import ConfigError, EquirayError
from equiray.nfn import ZooHyperparameters, train_zoo_nets
from equiray.data import resize
from equiray.data.parquet import shard_error
from equiray_pipelines.nfn.config import ZooConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooResult:
    """What ``equiray nfn zoo`` made: ``nets`` nets under ``out``. A trained zoo has ``test_accuracy`` (min,
    median, max over its nets); a zoo of ensemble members has ``val_accuracy`` and its ``source`` run instead."""

    out: str
    nets: int
    seconds: float
    test_accuracy: dict[str, float] = field(default_factory=dict)
    val_accuracy: dict[str, float] = field(default_factory=dict)
    source: str = ""
    table: str = ""  # empty (a zoo has no table): the fields the CLI prints for every result
    verdict: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The fields worth printing (empty ones left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("table", "verdict", "plots") and v not in ("", {}, ())}


def _spread(accs: list[float]) -> dict[str, float]:
    a = np.array(accs)
    return {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}


def _weight_columns(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A net's weights as one float32 blob in the state dict's order, and the layout that reads it back."""
    return {"weights": torch.cat([v.float().flatten() for v in state.values()]).numpy().tobytes(),
            "layout": json.dumps([[k, list(v.shape)] for k, v in state.items()])}


def _train_chunk(ids: list[int], hps: list[ZooHyperparameters], data, cfg: ZooConfig) -> list[dict]:
    """A Ray task: train a chunk of nets together (vectorized); return one Parquet row per net."""
    import ray

    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    x, y, xt, yt = data
    seeds = [cfg.seed * 100_003 + net_id for net_id in ids]
    nets = train_zoo_nets(hps, seeds, x, y, xt, yt, epochs=cfg.epochs, batch_size=cfg.batch_size, device=device)
    return [{"net_id": net_id, **dataclasses.asdict(hp), "test_accuracy": net.test_accuracy,
             "train_loss": net.train_loss, **_weight_columns(net.state_dict)}
            for net_id, hp, net in zip(ids, hps, nets)]


def run_zoo(cfg: ZooConfig, *, report_dir: str | os.PathLike | None = None) -> ZooResult:
    """Train the zoo on Ray tasks (or read an ensemble's members) and write it as Parquet shards (atomically)."""
    import ray

    from equiray.data import read_split
    from equiray_pipelines._ray import init_ray, log_cluster_once
    from equiray_pipelines.progress import Progress

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EquirayError(f"{out} already holds a zoo; --set overwrite=true to replace it, or --set out=OTHER")
    if cfg.from_ensemble:
        t0 = time.perf_counter()
        rows, source = member_rows(cfg.from_ensemble, cfg.ensemble_experiment)
        write_zoo(rows, out, {"config": to_dict(cfg), "nets": len(rows), "architecture": "small_cnn",
                              "source": source})
        return ZooResult(out=str(out), nets=len(rows), seconds=time.perf_counter() - t0, source=source,
                         val_accuracy=_spread([r["test_accuracy"] for r in rows]))
    cfg.data.check()
    x, y = read_split(cfg.data.dir, "train", limit=cfg.data.max_train)
    xt, yt = read_split(cfg.data.dir, "test", limit=cfg.data.max_eval)
    if x.shape[1] != 1:
        raise ConfigError(f"the zoo nets take 1-channel images; {cfg.data.source} has {x.shape[1]} channels")
    data = (resize(x, cfg.data.resize), y, resize(xt, cfg.data.resize), yt)
    rng = np.random.default_rng(cfg.seed)
    hps = [cfg.space.sample(rng) for _ in range(cfg.nets)]
    init_ray()
    log_cluster_once()
    task = ray.remote(_train_chunk).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None)
    data_ref = ray.put(data)
    # Nets with similar training fractions share a chunk: a vectorized chunk runs as many steps as its longest net.
    order = sorted(range(cfg.nets), key=lambda i: hps[i].train_fraction)
    chunks = [order[i:i + cfg.nets_per_task] for i in range(0, cfg.nets, cfg.nets_per_task)]
    t0 = time.perf_counter()
    pending = {task.remote(ids, [hps[i] for i in ids], data_ref, cfg): ids for ids in chunks}
    rows = []
    with Progress(cfg.nets, desc="nets trained", unit="nets", prefix="nfn zoo", every_s=0) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            rows += ray.get(ready[0])
            bar.update(len(pending.pop(ready[0])))
    rows.sort(key=lambda r: r["net_id"])
    write_zoo(rows, out, {"config": to_dict(cfg), "nets": len(rows), "architecture": "zoo_cnn"})
    return ZooResult(out=str(out), nets=len(rows), seconds=time.perf_counter() - t0,
                     test_accuracy=_spread([r["test_accuracy"] for r in rows]))


def write_zoo(rows: list[dict], out: Path, meta: dict) -> None:
    """Parquet shards + ``zoo.json``, written to a temporary directory and renamed into place (all or nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".zoo-", dir=out.parent if out.parent.exists() else None))
    try:
        table = pa.Table.from_pylist(rows)
        for i in range(0, len(rows), 256):
            pq.write_table(table.slice(i, 256), tmp / f"part-{i // 256:05d}.parquet", write_page_checksum=True)
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def member_rows(run: str, experiment: str) -> tuple[list[dict], str]:
    """The members of an ``ensemble train`` run as zoo rows: weights, setting, accuracy on the validation split."""
    import mlflow
    import yaml

    from equiray.config import load_config
    from equiray.data import read_split
    from equiray_pipelines import tracking
    from equiray_pipelines.ensemble import EnsembleConfig, find_train_run, load_members, member_state_dicts

    tracking.setup(experiment)
    run_id = find_train_run(experiment, None if run == "latest" else run)
    with tempfile.TemporaryDirectory() as tmp:
        raw = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                                      dst_path=tmp)).read_text())
    ens_cfg = load_config(EnsembleConfig, raw)
    ensembles, _ = load_members(run_id)
    meta = ens_cfg.data.prepare()
    x, y = read_split(str(Path(ens_cfg.data.dir).resolve()), "val", limit=min(1000, ens_cfg.eval.max_eval))
    x = resize(x, ens_cfg.data.resize or meta["shape"][0])
    settings = {s.name: s for s in ens_cfg.settings}
    rows = []
    for name, ens in ensembles.items():
        with torch.no_grad():
            logits = torch.cat([ens.eval().member_logits(x[i:i + 512]) for i in range(0, len(y), 512)], dim=1)
        acc = (logits.argmax(-1) == y).float().mean(1)
        s = settings[name]
        for m, state in enumerate(member_state_dicts(ens)):
            rows.append({"net_id": len(rows), "setting": name, "member": m, "support": s.support,
                         "augment": s.augment, "init": s.init, "architecture": "small_cnn",
                         "test_accuracy": float(acc[m]), "accuracy_split": "val", **_weight_columns(state)})
    return rows, f"ensemble train run {run_id}"


def read_zoo(path: str | os.PathLike) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """A zoo written by :func:`run_zoo`: its rows (without the weight blobs) and every net's state dict."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("part-*.parquet"))
    if not files:
        raise EquirayError(f"no zoo at {path} (expected part-*.parquet from `equiray nfn zoo`)")
    rows = []
    for f in files:
        try:
            rows += pq.read_table(f, page_checksum_verification=True).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise shard_error(f, exc, fix=f"build the zoo again with `equiray nfn zoo --set out={path} "
                                          "--set overwrite=true`") from None
    states = []
    for r in rows:
        flat = torch.from_numpy(np.frombuffer(r.pop("weights"), dtype=np.float32).copy())
        state, offset = {}, 0
        for name, shape in json.loads(r.pop("layout")):
            size = int(np.prod(shape)) if shape else 1
            state[name] = flat[offset:offset + size].view(shape)
            offset += size
        states.append(state)
    return rows, states


# ----------------------------------------------------------------------------------------- a zoo as features
def zoo_features(states: list[dict], rows: list[dict]):
    """A zoo's weights as metanetwork features, its spec and the symmetry group of its activation."""
    from equiray.nfn import features_from_normalized_cnns, features_from_state_dicts

    if rows and rows[0].get("architecture") == "small_cnn":  # ensemble members: tanh, sign flips (2 channels)
        feats, spec = features_from_normalized_cnns(states)
        return feats, spec, "sign"
    acts = {r.get("activation", "relu") for r in rows}
    if len(acts) > 1:
        raise EquirayError(f"the zoo mixes activations {sorted(acts)}; a metanetwork's symmetry group depends on it: "
                           "train on one of them (--set activation=relu) or build one zoo per activation")
    feats, spec = features_from_state_dicts(states)
    return feats, spec, {"relu": "positive", "tanh": "sign"}[acts.pop()]


def scaled_zoo(feats, spec, *, group: str, max_scale: float, seed: int):
    """Every net's hidden units permuted and rescaled at random (sign flips for tanh nets): same functions."""
    from equiray.nfn import apply_symmetry, random_symmetry

    transform = random_symmetry(spec, feats.batch_size, group=group, max_scale=max_scale,
                                generator=torch.Generator().manual_seed(seed))
    return apply_symmetry(feats.map(torch.Tensor.double), transform).map(torch.Tensor.float)


def split_nets(n: int, *, test_fraction: float, val_fraction: float, seed: int):
    """Random (train, validation, test) index tensors over ``n`` nets, at least 2 in each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = max(2, round(n * test_fraction)), max(2, round(n * val_fraction))
    if n - n_test - n_val < 2:
        raise EquirayError(f"a zoo of {n} nets is too small to split into train/val/test; train a larger one "
                           "(equiray nfn zoo --set nets=...)")
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]
