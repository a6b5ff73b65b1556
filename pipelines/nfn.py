"""A model zoo for metanetworks: many small CNNs trained with varied hyperparameters, fanned out as Ray tasks.

``equiray nfn zoo --config configs/nfn_zoo.yaml`` trains ``nets`` copies of the Small CNN Zoo network
(:func:`equiray.nfn.zoo_cnn`, 4,970 parameters) on Fashion-MNIST, each with its own optimizer, learning rate, L2,
dropout, initialization scale and training fraction drawn from ``space`` (the Small CNN Zoo's recipe), in chunks of
``nets_per_task`` per Ray task (one CPU or a GPU fraction each). Every net's weights (one float32 blob in the
state dict's order), its hyperparameters and its test accuracy are written to Parquet shards under ``out``,
atomically (a temporary directory renamed into place): the input of ``equiray.nfn`` metanetworks.

    python -m pipelines.nfn zoo --config configs/nfn_zoo.yaml
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equiray.config import to_dict
from equiray.errors import ConfigError, EquirayError
from pipelines._common import DataConfig, resize

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "rmsprop")
ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class ZooSpace:
    """Per-net hyperparameter ranges ([low, high]; log-uniform for lr, weight decay and init std)."""

    activation: tuple[str, ...] = ("relu",)
    optimizer: tuple[str, ...] = OPTIMIZERS
    lr: tuple[float, float] = (5e-4, 5e-2)
    weight_decay: tuple[float, float] = (1e-8, 1e-2)
    dropout: tuple[float, float] = (0.0, 0.5)
    init_std: tuple[float, float] = (1e-3, 0.5)
    train_fraction: tuple[float, float] = (0.1, 1.0)

    def __post_init__(self):
        if not self.activation or set(self.activation) - set(ACTIVATIONS):
            raise ConfigError(f"space.activation: choose from {list(ACTIVATIONS)}")
        if not self.optimizer or set(self.optimizer) - set(OPTIMIZERS):
            raise ConfigError(f"space.optimizer: choose from {list(OPTIMIZERS)}")
        for name in ("lr", "weight_decay", "dropout", "init_std", "train_fraction"):
            lo, hi = getattr(self, name)
            if not lo <= hi or lo < 0 or (name in ("lr", "weight_decay", "init_std") and lo <= 0):
                raise ConfigError(f"space.{name}: need 0 < low <= high, got [{lo}, {hi}]")
        if self.train_fraction[1] > 1 or self.dropout[1] >= 1:
            raise ConfigError("space: train_fraction <= 1 and dropout < 1")

    def sample(self, rng: np.random.Generator) -> dict:
        def log_uniform(lo, hi):
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

        return {"activation": str(rng.choice(self.activation)), "optimizer": str(rng.choice(self.optimizer)),
                "lr": log_uniform(*self.lr), "weight_decay": log_uniform(*self.weight_decay),
                "dropout": float(rng.uniform(*self.dropout)), "init_std": log_uniform(*self.init_std),
                "train_fraction": float(rng.uniform(*self.train_fraction))}


@dataclass(frozen=True)
class ZooConfig:
    data: DataConfig = DataConfig(max_train=6000, max_eval=2000)
    nets: int = 64
    nets_per_task: int = 8
    epochs: int = 2
    batch_size: int = 64
    space: ZooSpace = ZooSpace()
    seed: int = 0
    out: str = "data/zoo"  # Parquet shards of weights + hyperparameters + metrics
    overwrite: bool = False
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0

    def __post_init__(self):
        if self.nets < 1 or self.nets_per_task < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("nets, nets_per_task, epochs, batch_size: >= 1")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ConfigError("cpus_per_task > 0 and gpus_per_task >= 0")


def train_net(hp: dict, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor, *, epochs: int,
              batch_size: int, seed: int, device="cpu") -> tuple[torch.nn.Module, dict]:
    """One zoo net: initialise (normal, ``init_std``), train on ``train_fraction`` of the data, measure."""
    from equiray.nfn import zoo_cnn

    torch.manual_seed(seed)
    model = zoo_cnn(activation=hp["activation"], dropout=hp["dropout"]).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, hp["init_std"])
            else:
                p.zero_()
    params, lr, wd = model.parameters(), hp["lr"], hp["weight_decay"]
    opt = {"adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
           "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
           "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=wd)}[hp["optimizer"]]()
    gen = torch.Generator().manual_seed(seed)
    n = max(batch_size, int(len(y) * hp["train_fraction"]))
    subset = torch.randperm(len(y), generator=gen)[:n]
    loss_value = float("nan")
    for _ in range(epochs):
        model.train()
        for idx in subset[torch.randperm(n, generator=gen)].split(batch_size):
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = float(loss.detach())
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xt[i:i + 1024].to(device)).argmax(-1).cpu() for i in range(0, len(yt), 1024)])
    acc = float((pred == yt).float().mean())
    return model.cpu(), {"test_accuracy": acc if math.isfinite(loss_value) else 0.1, "train_loss": loss_value}


def _train_chunk(ids: list[int], hps: list[dict], data, cfg: dict) -> list[dict]:
    """A Ray task: train a chunk of nets one after the other; return one Parquet row per net."""
    import ray

    torch.set_num_threads(max(1, int(cfg["cpus_per_task"])))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    x, y, xt, yt = data
    rows = []
    for net_id, hp in zip(ids, hps):
        model, metrics = train_net(hp, x, y, xt, yt, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                   seed=cfg["seed"] * 100_003 + net_id, device=device)
        state = model.state_dict()
        blob = torch.cat([v.detach().float().flatten() for v in state.values()]).numpy().tobytes()
        rows.append({"net_id": net_id, **hp, **metrics, "weights": blob,
                     "layout": json.dumps([[k, list(v.shape)] for k, v in state.items()])})
    return rows


def run_zoo(cfg: ZooConfig, *, report_dir: str | os.PathLike | None = None) -> dict:
    """Train the zoo on Ray tasks and write it as Parquet shards (atomically)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from equiray.data import read_split
    from pipelines._ray import cluster_summary, init_ray, say

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EquirayError(f"{out} already holds a zoo; --set overwrite=true to replace it, or --set out=OTHER")
    cfg.data.prepare()
    x, y = read_split(cfg.data.dir, "train", limit=cfg.data.max_train)
    xt, yt = read_split(cfg.data.dir, "test", limit=cfg.data.max_eval)
    if x.shape[1] != 1:
        raise ConfigError(f"the zoo nets take 1-channel images; {cfg.data.source} has {x.shape[1]} channels")
    data = (resize(x, cfg.data.resize), y, resize(xt, cfg.data.resize), yt)
    rng = np.random.default_rng(cfg.seed)
    hps = [cfg.space.sample(rng) for _ in range(cfg.nets)]
    init_ray()
    log.info("Ray: %s", cluster_summary())
    task = ray.remote(_train_chunk).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None)
    data_ref = ray.put(data)
    raw = to_dict(cfg)
    chunks = [list(range(i, min(i + cfg.nets_per_task, cfg.nets))) for i in range(0, cfg.nets, cfg.nets_per_task)]
    t0 = time.perf_counter()
    pending = {task.remote(ids, [hps[i] for i in ids], data_ref, raw): ids for ids in chunks}
    rows, done = [], 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows += ray.get(ready[0])
        done += len(pending.pop(ready[0]))
        say(f"[nfn zoo] {done}/{cfg.nets} nets trained ({time.perf_counter() - t0:.0f} s)")
    rows.sort(key=lambda r: r["net_id"])
    tmp = Path(tempfile.mkdtemp(prefix=".zoo-", dir=out.parent if out.parent.exists() else None))
    try:
        table = pa.Table.from_pylist(rows)
        for i in range(0, len(rows), 256):
            pq.write_table(table.slice(i, 256), tmp / f"part-{i // 256:05d}.parquet")
        (tmp / "zoo.json").write_text(json.dumps({"config": raw, "nets": len(rows)}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accs = np.array([r["test_accuracy"] for r in rows])
    return {"out": str(out), "nets": len(rows), "seconds": time.perf_counter() - t0,
            "test_accuracy": {"min": float(accs.min()), "median": float(np.median(accs)), "max": float(accs.max())}}


def read_zoo(path: str | os.PathLike) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """A zoo written by :func:`run_zoo`: its rows (without the weight blobs) and every net's state dict."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("part-*.parquet"))
    if not files:
        raise EquirayError(f"no zoo at {path} (expected part-*.parquet from `equiray nfn zoo`)")
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
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


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("nfn", argv)


if __name__ == "__main__":
    raise SystemExit(main())
