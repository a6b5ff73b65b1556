"""Metanetworks over a model zoo: train the zoo on Ray tasks, then learn to read accuracy off the weights.

``equiray nfn zoo --config configs/nfn_zoo.yaml`` trains ``nets`` copies of the Small CNN Zoo network
(:func:`equiray.nfn.zoo_cnn`, 4,970 parameters) on Fashion-MNIST, each with its own optimizer, learning rate, L2,
dropout, initialization scale and training fraction drawn from ``space`` (the Small CNN Zoo's recipe), in chunks of
``nets_per_task`` per Ray task (one CPU or a GPU fraction each), trained together as one grouped computation
(:class:`StackedZooNets`; nets of similar training fraction share a task). Every net's weights (one float32 blob in the
state dict's order), its hyperparameters and its test accuracy are written to Parquet shards under ``out``,
atomically (a temporary directory renamed into place): the input of ``equiray.nfn`` metanetworks.

``equiray nfn train --config configs/nfn_train.yaml`` fits metanetworks (Monomial-NFN, STATNN, ...) that predict
each net's test accuracy from its weights, on the plain zoo and on the same zoo with every net's hidden units
randomly rescaled (a function-preserving change that permutation-only metanetworks do not see through), one Ray
task per (metanetwork, zoo). Kendall tau on held-out nets, per-epoch curves and a predicted-vs-true plot go to
MLflow; the champion is registered as ``equiray-nfn@champion``.

    python -m pipelines.nfn zoo --config configs/nfn_zoo.yaml
    python -m pipelines.nfn train --config configs/nfn_train.yaml
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from equiray.config import to_dict
from equiray.errors import ConfigError, EquirayError
from pipelines._common import DataConfig, TrackingConfig, resize

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
    # "latest" or an `ensemble train` run id: the zoo is that run's members instead (small_cnn nets; their
    # accuracy measured on the validation split, so the test split stays unseen by `ensemble eval --select-by nfn`)
    from_ensemble: str | None = None
    ensemble_experiment: str = "equiray-ensemble"

    def __post_init__(self):
        if self.nets < 1 or self.nets_per_task < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("nets, nets_per_task, epochs, batch_size: >= 1")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ConfigError("cpus_per_task > 0 and gpus_per_task >= 0")


def _init_net(hp: dict, seed: int) -> torch.nn.Module:
    """One zoo net as the Small CNN Zoo initialises it: weights normal(0, ``init_std``), biases zero."""
    from equiray.nfn import zoo_cnn

    torch.manual_seed(seed)
    model = zoo_cnn(activation=hp["activation"], dropout=hp["dropout"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, hp["init_std"])
            else:
                p.zero_()
    return model


def _batches(hp: dict, n_data: int, *, epochs: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """A net's minibatches, all epochs in order: its ``train_fraction`` subset, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = max(batch_size, int(n_data * hp["train_fraction"]))
    subset = torch.randperm(n_data, generator=gen)[:n]
    return [idx for _ in range(epochs) for idx in subset[torch.randperm(n, generator=gen)].split(batch_size)]


class StackedZooNets:
    """M zoo nets trained at once, as one grouped computation: the members' convolutions are one ``groups=M``
    convolution, their heads one batched matmul, and their optimizers (Adam, SGD with momentum 0.9 or RMSprop,
    each net its own learning rate and L2, as ``torch.optim`` defines them) one vectorized update. Each net keeps
    its own data order, training fraction (nets with fewer steps sit out the last steps), dropout rate and
    initialization, so the result equals training the nets one by one, up to float rounding."""

    BETAS, EPS, MOMENTUM, ALPHA = (0.9, 0.999), 1e-8, 0.9, 0.99

    def __init__(self, hps: list[dict], seeds: list[int], device="cpu"):
        nets = [_init_net(hp, s) for hp, s in zip(hps, seeds)]
        self.templates = nets
        self.params = [torch.stack([p.detach() for p in ps]).to(device).requires_grad_()
                       for ps in zip(*(list(n.parameters()) for n in nets))]  # conv1 w, b, conv2 w, b, ..., head w, b
        col = lambda key: torch.tensor([float(hp[key]) for hp in hps], device=device)  # noqa: E731
        self.lr, self.wd, self.dropout = col("lr"), col("weight_decay"), col("dropout")
        self.kind = torch.tensor([OPTIMIZERS.index(hp["optimizer"]) for hp in hps], device=device)
        acts = [hp["activation"] for hp in hps]
        # one activation for the chunk, or (mixed chunk) a (1, M, 1, 1, 1) mask of the nets that use ReLU
        self.act = {"relu": torch.relu, "tanh": torch.tanh}[acts[0]] if len(set(acts)) == 1 else None
        self.relu_mask = torch.tensor([a == "relu" for a in acts], device=device).view(1, -1, 1, 1, 1)
        self.m = [torch.zeros_like(p) for p in self.params]  # Adam exp_avg | SGD momentum buffer
        self.v = [torch.zeros_like(p) for p in self.params]  # Adam exp_avg_sq | RMSprop square_avg
        self.steps = torch.zeros(len(hps), device=device)
        self.size = len(hps)

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (like.dim() - 1)))

    def forward(self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` (M, B, C, H, W), one batch per net -> logits (M, B, classes)."""
        M, B = x.shape[:2]
        h = x.transpose(0, 1).reshape(B, -1, *x.shape[-2:])  # (B, M*C, H, W)
        convs, (wh, bh) = self.params[:-2], self.params[-2:]
        for w, b in zip(convs[0::2], convs[1::2]):
            h = torch.nn.functional.conv2d(h, w.flatten(0, 1), b.flatten(), stride=2, groups=M)
            h = h.view(B, M, w.shape[1], *h.shape[-2:])
            h = self.act(h) if self.act is not None else torch.where(self.relu_mask, torch.relu(h), torch.tanh(h))
            if train and bool((self.dropout > 0).any()):
                keep = 1 - self.dropout.view(1, M, 1, 1, 1)
                mask = torch.rand(h.shape, generator=generator, device=h.device) < keep
                h = h * mask / keep
            h = h.flatten(1, 2)
        pooled = h.view(B, M, -1, *h.shape[-2:]).mean(dim=(-2, -1))  # (B, M, width)
        return torch.einsum("bmc,moc->mbo", pooled, wh) + bh[:, None]

    @torch.no_grad()
    def _update(self, active: torch.Tensor) -> None:
        """One optimizer step for the ``active`` nets, each with its own optimizer kind and hyperparameters."""
        self.steps += active.float()
        t = self.steps.clamp_min(1)
        b1, b2 = self.BETAS
        for i, p in enumerate(self.params):
            view = lambda v: self._view(v, p)  # noqa: E731
            g = p.grad + view(self.wd) * p
            on, kind = view(active), view(self.kind)
            # Adam
            m_adam = b1 * self.m[i] + (1 - b1) * g
            v_adam = b2 * self.v[i] + (1 - b2) * g * g
            denom = (v_adam.sqrt() / view(torch.sqrt(1 - b2 ** t))) + self.EPS
            p_adam = p - view(self.lr / (1 - b1 ** t)) * m_adam / denom
            # SGD, momentum 0.9 (the first step's buffer is the gradient itself)
            m_sgd = torch.where(view(self.steps == 1), g, self.MOMENTUM * self.m[i] + g)
            p_sgd = p - view(self.lr) * m_sgd
            # RMSprop
            v_rms = self.ALPHA * self.v[i] + (1 - self.ALPHA) * g * g
            p_rms = p - view(self.lr) * g / (v_rms.sqrt() + self.EPS)
            new_p = torch.where(kind == 0, p_adam, torch.where(kind == 1, p_sgd, p_rms))
            new_m = torch.where(kind == 0, m_adam, m_sgd)
            new_v = torch.where(kind == 0, v_adam, v_rms)
            p.copy_(torch.where(on, new_p, p))
            self.m[i].copy_(torch.where(on, new_m, self.m[i]))
            self.v[i].copy_(torch.where(on, new_v, self.v[i]))
            p.grad = None

    def fit(self, x: torch.Tensor, y: torch.Tensor, batches: list[list[torch.Tensor]], *, batch_size: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Train on each net's own list of index batches; returns every net's last training loss (M,)."""
        device = self.params[0].device
        steps = max(len(b) for b in batches)
        last = torch.full((self.size,), float("nan"), device=device)
        for step in range(steps):
            idx = torch.zeros(self.size, batch_size, dtype=torch.long)
            valid = torch.zeros(self.size, batch_size, dtype=torch.bool)
            for m, bs in enumerate(batches):
                if step < len(bs):
                    idx[m, :len(bs[step])], valid[m, :len(bs[step])] = bs[step], True
            idx, valid = idx.to(device), valid.to(device)
            active = valid.any(1)
            logits = self.forward(x[idx].to(device), train=True, generator=generator)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[idx].to(device).flatten(),
                                                   reduction="none").view(self.size, batch_size)
            per_net = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
            per_net.sum().backward()
            self._update(active)
            last = torch.where(active, per_net.detach(), last)
        return last

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        device = self.params[0].device
        correct = torch.zeros(self.size, device=device)
        for i in range(0, len(y), chunk):
            xb = x[i:i + chunk].to(device)
            logits = self.forward(xb.expand(self.size, *xb.shape), train=False)
            correct += (logits.argmax(-1) == y[i:i + chunk].to(device)).float().sum(1)
        return correct / len(y)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every net's weights under its own ``zoo_cnn`` parameter names."""
        out = []
        for m, template in enumerate(self.templates):
            names = [n for n, _ in template.named_parameters()]
            out.append({n: p[m].detach().cpu().clone() for n, p in zip(names, self.params)})
        return out


def train_nets(hps: list[dict], seeds: list[int], x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor,
               yt: torch.Tensor, *, epochs: int, batch_size: int, device="cpu") -> list[tuple[dict, dict]]:
    """Train a chunk of zoo nets together (:class:`StackedZooNets`); (state dict, metrics) per net. A net whose
    training diverged (non-finite loss) is scored at chance, as in the Small CNN Zoo."""
    nets = StackedZooNets(hps, seeds, device=device)
    batches = [_batches(hp, len(y), epochs=epochs, batch_size=batch_size, seed=s) for hp, s in zip(hps, seeds)]
    last = nets.fit(x, y, batches, batch_size=batch_size, generator=torch.Generator(device=device).manual_seed(
        seeds[0]))
    acc = nets.accuracy(xt, yt)
    finite = torch.stack([torch.isfinite(p.detach()).flatten(1).all(1) for p in nets.params]).all(0)
    chance = 1.0 / (int(y.max()) + 1)
    return [(sd, {"test_accuracy": float(a) if bool(ok) and torch.isfinite(torch.tensor(float(l))) else chance,
                  "train_loss": float(l)})
            for sd, a, l, ok in zip(nets.state_dicts(), acc.tolist(), last.tolist(), finite.tolist())]


def _train_chunk(ids: list[int], hps: list[dict], data, cfg: dict) -> list[dict]:
    """A Ray task: train a chunk of nets together (vectorized); return one Parquet row per net."""
    import ray

    torch.set_num_threads(max(1, int(cfg["cpus_per_task"])))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    x, y, xt, yt = data
    seeds = [cfg["seed"] * 100_003 + net_id for net_id in ids]
    rows = []
    for net_id, hp, (state, metrics) in zip(ids, hps, train_nets(hps, seeds, x, y, xt, yt, epochs=cfg["epochs"],
                                                                  batch_size=cfg["batch_size"], device=device)):
        blob = torch.cat([v.float().flatten() for v in state.values()]).numpy().tobytes()
        rows.append({"net_id": net_id, **hp, **metrics, "weights": blob,
                     "layout": json.dumps([[k, list(v.shape)] for k, v in state.items()])})
    return rows


def run_zoo(cfg: ZooConfig, *, report_dir: str | os.PathLike | None = None) -> dict:
    """Train the zoo on Ray tasks (or read an ensemble's members) and write it as Parquet shards (atomically)."""
    import ray

    from equiray.data import read_split
    from pipelines._ray import cluster_summary, init_ray, say

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EquirayError(f"{out} already holds a zoo; --set overwrite=true to replace it, or --set out=OTHER")
    if cfg.from_ensemble:
        t0 = time.perf_counter()
        rows, source = member_rows(cfg.from_ensemble, cfg.ensemble_experiment)
        write_zoo(rows, out, {"config": to_dict(cfg), "nets": len(rows), "architecture": "small_cnn",
                              "source": source})
        accs = np.array([r["test_accuracy"] for r in rows])
        return {"out": str(out), "nets": len(rows), "seconds": time.perf_counter() - t0, "source": source,
                "val_accuracy": {"min": float(accs.min()), "median": float(np.median(accs)), "max": float(accs.max())}}
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
    # Nets with similar training fractions share a chunk: a vectorized chunk runs as many steps as its longest net.
    order = sorted(range(cfg.nets), key=lambda i: hps[i]["train_fraction"])
    chunks = [order[i:i + cfg.nets_per_task] for i in range(0, cfg.nets, cfg.nets_per_task)]
    t0 = time.perf_counter()
    pending = {task.remote(ids, [hps[i] for i in ids], data_ref, raw): ids for ids in chunks}
    rows, done = [], 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        rows += ray.get(ready[0])
        done += len(pending.pop(ready[0]))
        say(f"[nfn zoo] {done}/{cfg.nets} nets trained ({time.perf_counter() - t0:.0f} s)")
    rows.sort(key=lambda r: r["net_id"])
    write_zoo(rows, out, {"config": raw, "nets": len(rows), "architecture": "zoo_cnn"})
    accs = np.array([r["test_accuracy"] for r in rows])
    return {"out": str(out), "nets": len(rows), "seconds": time.perf_counter() - t0,
            "test_accuracy": {"min": float(accs.min()), "median": float(np.median(accs)), "max": float(accs.max())}}


def write_zoo(rows: list[dict], out: Path, meta: dict) -> None:
    """Parquet shards + ``zoo.json``, written to a temporary directory and renamed into place (all or nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=".zoo-", dir=out.parent if out.parent.exists() else None))
    try:
        table = pa.Table.from_pylist(rows)
        for i in range(0, len(rows), 256):
            pq.write_table(table.slice(i, 256), tmp / f"part-{i // 256:05d}.parquet")
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
    from pipelines import _tracking
    from pipelines.ensemble import EnsembleConfig, find_train_run, load_members, member_state_dicts

    _tracking.setup(experiment)
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
                         "test_accuracy": float(acc[m]), "accuracy_split": "val",
                         "weights": torch.cat([v.float().flatten() for v in state.values()]).numpy().tobytes(),
                         "layout": json.dumps([[k, list(v.shape)] for k, v in state.items()])})
    return rows, f"ensemble train run {run_id}"


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


# ----------------------------------------------------------------------------------------- nfn train
ZOOS = ("plain", "scaled")


def _default_metanetworks() -> dict:
    return {"monomial-nfn": {"hidden_channels": 16, "num_layers": 2, "mlp_hidden": [32, 32], "path_norms": True},
            "statnn": {"mlp_hidden": [64, 64]}}


@dataclass(frozen=True)
class NFNTrainConfig:
    zoo: str = "data/zoo"  # written by `equiray nfn zoo`
    # metanetwork name (equiray.nfn.list_metanetworks()) -> its constructor options
    metanetworks: dict = field(default_factory=_default_metanetworks)
    activation: str | None = None  # a mixed ReLU + tanh zoo: train on the nets with this activation only
    zoos: tuple[str, ...] = ZOOS  # "plain", and "scaled": every net's hidden units rescaled at random
    max_scale: float = 1e4  # scaled zoo: per hidden unit d log-uniform in [1/max_scale, max_scale]
    test_fraction: float = 0.25  # held-out nets, scored with Kendall tau
    val_fraction: float = 0.15  # picks the epoch kept (best validation tau)
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    tracking: TrackingConfig = TrackingConfig(experiment="equiray-nfn", registered_model="equiray-nfn",
                                              alias="champion")

    def __post_init__(self):
        from equiray.nfn import list_metanetworks

        unknown = set(self.metanetworks) - set(list_metanetworks())
        if not self.metanetworks or unknown:
            raise ConfigError(f"metanetworks: unknown {sorted(unknown)}; choose from {list_metanetworks()}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: choose from {list(ACTIVATIONS)} (or leave it out for a one-activation zoo)")
        if not self.zoos or set(self.zoos) - set(ZOOS):
            raise ConfigError(f"zoos: choose from {list(ZOOS)}")
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1):
            raise ConfigError("test_fraction and val_fraction in (0, 1), together < 1")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_scale < 1:
            raise ConfigError("epochs >= 1, batch_size >= 1, lr > 0, max_scale >= 1")


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
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = max(2, round(n * test_fraction)), max(2, round(n * val_fraction))
    if n - n_test - n_val < 2:
        raise EquirayError(f"a zoo of {n} nets is too small to split into train/val/test; train a larger one "
                           "(equiray nfn zoo --set nets=...)")
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def _fit_task(name: str, kwargs: dict, zoo: str, feats, spec, group: str, targets, splits, cfg: dict) -> dict:
    """A Ray task: fit one metanetwork on one zoo; return its weights, curves and held-out predictions."""
    import ray

    from equiray.nfn import count_parameters, create_metanetwork, fit_metanetwork, kendall_tau, predict

    torch.set_num_threads(max(1, int(cfg["cpus_per_task"])))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg["seed"])
    opts = {**kwargs, "in_channels": feats.weights[0].shape[1]}
    if name == "monomial-nfn":
        opts.setdefault("group", group)
    model = create_metanetwork(name, spec, **opts).to(device)
    feats = feats.to(device)
    train_idx, val_idx, test_idx = splits
    fit = fit_metanetwork(model, feats, targets, train_idx=train_idx, val_idx=val_idx, epochs=cfg["epochs"],
                          batch_size=cfg["batch_size"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                          seed=cfg["seed"])
    pred = (predict(model, feats[test_idx.to(device)]) * fit.std + fit.mean).cpu()
    return {"name": name, "zoo": zoo, "options": opts, "params": count_parameters(model),
            "state": {k: v.cpu() for k, v in model.state_dict().items()}, "history": fit.history,
            "best_epoch": fit.best_epoch, "val_tau": fit.history[fit.best_epoch - 1]["val_tau"],
            "test_tau": kendall_tau(pred, targets[test_idx]), "seconds": fit.seconds, "mean": fit.mean,
            "std": fit.std, "pred": pred.tolist(), "true": targets[test_idx].tolist()}


def run_train(cfg: NFNTrainConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Fit every metanetwork on every zoo as Ray tasks; log, plot, register the champion."""
    import mlflow
    import ray

    from pipelines import _tracking
    from pipelines._ray import cluster_summary, init_ray, say

    rows, states = read_zoo(cfg.zoo)
    if cfg.activation is not None:
        keep = [i for i, r in enumerate(rows) if r.get("activation") == cfg.activation]
        if not keep:
            raise EquirayError(f"no {cfg.activation} nets in the zoo at {cfg.zoo}")
        rows, states = [rows[i] for i in keep], [states[i] for i in keep]
    feats, spec, group = zoo_features(states, rows)
    targets = torch.tensor([r["test_accuracy"] for r in rows], dtype=torch.float32)
    splits = split_nets(len(rows), test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed)
    uri = _tracking.tracking_uri()
    _tracking.setup(cfg.tracking.experiment, uri)
    zoo_meta = (Path(cfg.zoo) / "zoo.json").read_text() if (Path(cfg.zoo) / "zoo.json").exists() else str(len(rows))
    cfg_hash = _tracking.config_hash({"config": to_dict(cfg), "zoo": zoo_meta})
    if reuse:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias, config_hash_value=cfg_hash)
        if mv is not None:
            results, plot = _tracking.fetch_results(mv.run_id, "nfn_results.json", "nfn_scatter.png", report_dir)
            return {**_summary(results, cfg), "run_id": mv.run_id, "version": str(mv.version), "plot": str(plot),
                    "reused": True, "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"}
    data = {"plain": feats}
    if "scaled" in cfg.zoos:
        data["scaled"] = scaled_zoo(feats, spec, group=group, max_scale=cfg.max_scale, seed=cfg.seed + 1)
    init_ray()
    log.info("Ray: %s", cluster_summary())
    task = ray.remote(_fit_task).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None)
    raw = to_dict(cfg)
    refs = {task.remote(name, kwargs, zoo, data[zoo], spec, group, targets, splits, raw): (name, zoo)
            for zoo in cfg.zoos for name, kwargs in cfg.metanetworks.items()}
    run_name = cfg.tracking.run_name or f"nfn-train-{time.strftime('%Y%m%d-%H%M%S')}"
    results, t0 = [], time.perf_counter()
    with mlflow.start_run(run_name=run_name) as active:
        run_id = active.info.run_id
        _tracking.log_config(cfg)
        mlflow.set_tags({"equiray.pipeline": "nfn-train", "equiray.zoo": str(Path(cfg.zoo).resolve())})
        mlflow.log_params({"zoo_nets": len(rows), "train_nets": len(splits[0]), "test_nets": len(splits[2])})
        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            res = ray.get(ready[0])
            pending.pop(ready[0])
            say(f"[nfn train] {res['name']} on the {res['zoo']} zoo: test tau {res['test_tau']:.3f} "
                f"({len(results) + 1}/{len(refs)}, {time.perf_counter() - t0:.0f} s)")
            with mlflow.start_run(run_name=f"{res['name']}-{res['zoo']}", nested=True):
                mlflow.log_params({"metanetwork": res["name"], "zoo": res["zoo"], "parameters": res["params"],
                                   **{f"options.{k}": v for k, v in res["options"].items()}})
                for rec in res["history"]:
                    mlflow.log_metrics({"train_loss": rec["train_loss"], "val_tau": rec["val_tau"]}, step=rec["epoch"])
                mlflow.log_metrics({"test_tau": res["test_tau"], "train_seconds": res["seconds"],
                                    "best_epoch": res["best_epoch"]})
            results.append(res)
        results.sort(key=lambda r: (list(cfg.zoos).index(r["zoo"]), list(cfg.metanetworks).index(r["name"])))
        champion = _champion(results)
        summary = _summary(results, cfg)
        for r in results:
            mlflow.log_metric(f"test_tau/{r['name']}/{r['zoo']}", r["test_tau"])
        plot = _scatter(results, report_dir)
        mlflow.log_artifact(str(plot))
        mlflow.log_text(summary["table"], "nfn_table.md")
        mlflow.log_text(json.dumps([{k: v for k, v in r.items() if k != "state"} for r in results]),
                        "nfn_results.json")
        model = _rebuild(champion, spec)
        model_spec = {"builder": "metanetwork", "name": champion["name"], "kwargs": champion["options"],
                      "network_spec": [[l.out_features, l.in_features, list(l.kernel_size)] for l in spec.layers],
                      "target": "test_accuracy", "target_mean": champion["mean"], "target_std": champion["std"],
                      "trained_on": champion["zoo"], "group": group}
        model_uri = _tracking.log_model(model, model_spec, name="metanetwork")
        version = _tracking.register(model_uri, cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"run_id": run_id, "metanetwork": champion["name"],
                                           "test_tau": f"{champion['test_tau']:.4f}", "equiray.config_hash": cfg_hash})
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "nfn_table.md").write_text(summary["table"] + "\n")
    return {**summary, "run_id": run_id, "version": version, "plot": str(plot), "reused": False,
            "tracking_uri": uri, "registered": f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}",
            "model_uri": model_uri, "seconds": time.perf_counter() - t0}


def _champion(results: list[dict]) -> dict:
    """The metanetwork whose worst validation tau over the zoos is highest (a model that holds under rescaling),
    as trained on the plain zoo (the nets as they were trained)."""
    names = {r["name"] for r in results}
    worst = {n: min(r["val_tau"] for r in results if r["name"] == n) for n in names}
    best = max(sorted(names), key=lambda n: worst[n])
    return next(r for r in sorted(results, key=lambda r: r["zoo"] != "plain") if r["name"] == best)


def _rebuild(result: dict, spec):
    from equiray.nfn import create_metanetwork

    model = create_metanetwork(result["name"], spec, **result["options"])
    model.load_state_dict(result["state"])
    return model.eval()


def _summary(results: list[dict], cfg: NFNTrainConfig) -> dict:
    zoos = [z for z in ZOOS if any(r["zoo"] == z for r in results)]
    names = list(dict.fromkeys(r["name"] for r in results))
    get = {(r["name"], r["zoo"]): r for r in results}
    lines = ["| metanetwork | parameters | " + " | ".join(f"Kendall tau, {z} zoo" for z in zoos) +
             " | training s |", "|---|---|" + "---|" * len(zoos) + "---|"]
    for n in names:
        some = next(r for r in results if r["name"] == n)
        taus = " | ".join(f"{get[(n, z)]['test_tau']:.3f}" if (n, z) in get else "-" for z in zoos)
        secs = sum(r["seconds"] for r in results if r["name"] == n)
        lines.append(f"| {n} | {some['params']:,} | {taus} | {secs:.0f} |")
    taus = {f"{r['name']}/{r['zoo']}": r["test_tau"] for r in results}
    verdict = []
    if "monomial-nfn" in names and "plain" in zoos:
        others = [n for n in names if n != "monomial-nfn"]
        for z in zoos:
            mine = get[("monomial-nfn", z)]["test_tau"]
            for o in others:
                theirs = get[(o, z)]["test_tau"]
                verdict.append(f"{z} zoo: Monomial-NFN tau {mine:.3f} vs {o} {theirs:.3f} "
                               f"({'matches or beats' if mine >= theirs - 0.01 else 'below'})")
    return {"table": "\n".join(lines), "verdict": verdict, "tau": taus,
            "champion": _champion(results)["name"]}


def _scatter(results: list[dict], report_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zoos = list(dict.fromkeys(r["zoo"] for r in results))
    names = list(dict.fromkeys(r["name"] for r in results))
    fig, axes = plt.subplots(len(zoos), len(names), figsize=(3.6 * len(names), 3.4 * len(zoos)), squeeze=False)
    for r in results:
        ax = axes[zoos.index(r["zoo"])][names.index(r["name"])]
        ax.scatter(r["true"], r["pred"], s=14, alpha=0.8)
        lo, hi = min(r["true"] + r["pred"]), max(r["true"] + r["pred"])
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_title(f"{r['name']}, {r['zoo']} zoo: tau {r['test_tau']:.3f}", fontsize=9)
        ax.set_xlabel("true test accuracy")
        ax.set_ylabel("predicted")
    fig.suptitle("Held-out nets: accuracy predicted from weights", fontsize=10)
    fig.tight_layout()
    out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-plots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "nfn_scatter.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("nfn", argv)


if __name__ == "__main__":
    raise SystemExit(main())
