"""Augmentation ensembles on Ray Train: member groups fanned out over workers, checkpointed, evaluated.

``equiray ensemble train``: every *setting* (filter support x augmentation x initialization) gets ``members``
members; members are cut into *member groups* of ``members_per_group`` that one worker trains at once,
vectorized (:class:`equiray.ensembles.StackedEnsemble`). Group ``i`` goes to worker ``i % num_workers``, so a
10,000-member run is the same config with more workers. Every worker reads the whole training set through
Ray Data (not split: each member sees all of it) into memory.

Work proceeds in rounds (one epoch of one group per worker per round); after each round every worker saves
the state of all its groups (weights, optimizer, random generators, epochs done) and reports it as one Ray
Train checkpoint. When a worker dies, Ray Train restarts the worker group from the latest checkpoint and
training continues where it stopped; the driver checks at the end that every member is present exactly once.

``equiray ensemble eval``: OSP and symmetric KL (and accuracy) of the ensemble mean as functions of
ensemble size (bootstrap), in distribution and off the data manifold, one line per setting; plot + table.

    python -m pipelines.ensemble train --config configs/ensemble.yaml
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
from typing import Any, Literal

import torch

from equiray.config import to_dict
from equiray.errors import ConfigError, EquirayError
from equiray.groups import get_group
from pipelines._common import (DataConfig, ScalingConfig, TrackingConfig, fit, load_shard, resize,
                               worker_threads)
from pipelines._ray import say

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingConfig:
    name: str
    support: Literal["full", "symmetric", "asymmetric"] = "symmetric"
    augment: bool = True
    init: Literal["default", "invariant"] = "default"


DEFAULT_SETTINGS = (
    SettingConfig("symmetric+aug", "symmetric", True),
    SettingConfig("symmetric, no aug", "symmetric", False),
    SettingConfig("asymmetric+aug", "asymmetric", True),
    SettingConfig("asymmetric+aug, invariant init", "asymmetric", True, "invariant"),
)


@dataclass(frozen=True)
class MemberConfig:
    name: str = "small_cnn"  # small_cnn (Nordenfors & Flinth's net) or any model without BatchNorm
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16})


@dataclass(frozen=True)
class EnsembleTrainSection:
    epochs: int = 3
    batch_size: int = 32  # per member, as in the paper
    lr: float = 0.01
    # the paper uses SGD (lr 0.01, 10 epochs); Adam is elementwise, so it commutes with the group's permutation
    # of filter entries and keeps the theorem's symmetry argument, and it learns far faster in a short run
    optimizer: Literal["sgd", "adam"] = "adam"
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("train: epochs and batch_size must be >= 1 and lr > 0")


@dataclass(frozen=True)
class EnsembleTracking(TrackingConfig):
    experiment: str = "equiray-ensemble"
    registered_model: str = "equiray-ensemble"
    alias: str = "champion"
    champion: str | None = None  # the setting registered as the ensemble; default: the first setting


@dataclass(frozen=True)
class EnsembleEvalSection:
    max_eval: int = 2000  # test images (in distribution)
    off_manifold: str = "digits"  # another dataset, resized to the members' input size
    max_off_manifold: int = 1000
    repeats: int = 20  # bootstrap subsets per ensemble size
    sizes: tuple[int, ...] = ()  # default: 1, 2, 5, 10, 20, ... up to all members
    # "nfn": a registered metanetwork predicts every member's accuracy from its weights and the weakest
    # drop_fraction are left out of the average; compared with the whole ensemble and random subsets of that size
    select_by: Literal["none", "nfn"] = "none"
    nfn_model: str = "models:/equiray-nfn-members@champion"  # trained on a zoo of members (nfn_train_members.yaml)
    drop_fraction: float = 0.25

    def __post_init__(self):
        if not 0 < self.drop_fraction < 1:
            raise ConfigError(f"eval.drop_fraction must be in (0, 1), got {self.drop_fraction}")


@dataclass(frozen=True)
class EnsembleConfig:
    data: DataConfig = DataConfig(max_train=4000, resize=14)
    member: MemberConfig = MemberConfig()
    group: str = "C4"
    settings: tuple[SettingConfig, ...] = DEFAULT_SETTINGS
    members: int = 24  # per setting
    members_per_group: int = 8  # trained together, vectorized, by one worker
    train: EnsembleTrainSection = EnsembleTrainSection()
    scaling: ScalingConfig = ScalingConfig()
    tracking: EnsembleTracking = EnsembleTracking()
    eval: EnsembleEvalSection = EnsembleEvalSection()
    storage_path: str = "runs"
    max_failures: int = 2  # worker-group restarts Ray Train may do (from the latest checkpoint)

    def __post_init__(self):
        get_group(self.group)
        if self.members < 1 or self.members_per_group < 1:
            raise ConfigError("members and members_per_group must be >= 1")
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise ConfigError("settings: give at least one setting, with distinct names")
        if self.tracking.champion is not None and self.tracking.champion not in names:
            raise ConfigError(f"tracking.champion {self.tracking.champion!r} is not one of the settings {names}")

    def member_groups(self) -> list[dict]:
        """Every member group: id, setting index and its global member ids (stable across restarts)."""
        groups = []
        for s in range(len(self.settings)):
            ids = [s * self.members + m for m in range(self.members)]
            for start in range(0, self.members, self.members_per_group):
                groups.append({"gid": len(groups), "setting": s, "members": ids[start:start + self.members_per_group]})
        return groups


# ----------------------------------------------------------------------------------------- worker side
def _member_seed(base: int, member_id: int) -> int:
    return (base * 1_000_003 + member_id * 7919 + 17) % (2**63 - 1)


def _new_group_state(cfg: dict, group: dict, spec):
    from equiray.ensembles import build_members

    setting = cfg["settings"][group["setting"]]
    spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "support": setting["support"]})  # the setting's support
    seeds = [_member_seed(cfg["train"]["seed"], m) for m in group["members"]]
    ens = build_members(spec, seeds, init=setting["init"], group=cfg["group"])
    gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
    return ens, gens, 0


def _optimizer(cfg: dict, ens):
    t = cfg["train"]
    if t["optimizer"] == "adam":
        return torch.optim.Adam(ens.parameters(), lr=t["lr"])
    return torch.optim.SGD(ens.parameters(), lr=t["lr"])


def _save_state(path: Path, ens, opt, gens, epochs_done: int, group: dict, nodes: list[str]) -> None:
    torch.save({"model": ens.state_dict(), "optimizer": opt.state_dict(),
                "generators": [g.get_state() for g in gens], "epochs_done": epochs_done, "group": group,
                "nodes": nodes}, path)


def _train_one_epoch(cfg: dict, group: dict, state_file: Path, spec, x, y, group_obj, device) -> dict:
    """Load (or initialise) one member group, train it one epoch, save its state back to ``state_file``."""
    from equiray.ensembles import train_members_epoch

    import ray

    ens, gens, epochs_done = _new_group_state(cfg, group, spec)
    ens = ens.to(device)
    opt = _optimizer(cfg, ens)
    nodes: list[str] = []  # the Ray node of every epoch (a restarted worker group may land elsewhere)
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        ens.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        for gen, st in zip(gens, state["generators"]):
            gen.set_state(st)
        epochs_done = state["epochs_done"]
        nodes = list(state.get("nodes", []))
    setting = cfg["settings"][group["setting"]]
    stats = train_members_epoch(ens, x, y, opt, batch_size=cfg["train"]["batch_size"],
                                group=group_obj if setting["augment"] else None, generators=gens, device=device)
    _save_state(state_file, ens, opt, gens, epochs_done + 1, group, nodes + [ray.get_runtime_context().get_node_id()])
    return {**stats, "epochs_done": epochs_done + 1}


def train_loop_per_worker(cfg: dict) -> None:
    """Train this worker's member groups round by round; checkpoint all of them after every round."""
    import ray.train
    from mlflow import MlflowClient

    from equiray.ensembles import MemberSpec

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg["scaling"]["torch_threads"])
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["scaling"]["use_gpu"] and torch.cuda.is_available() \
        else torch.device("cpu")
    x, y = load_shard(ray.train.get_dataset_shard("train"), size=cfg["data"]["resize"], limit=cfg["data"]["max_train"])
    x, y = x.to(device), y.to(device)
    spec = MemberSpec(cfg["member"]["name"], cfg["member"]["kwargs"], int(x.shape[1]), cfg["num_classes"])
    group_obj = get_group(cfg["group"])
    mine = [g for g in cfg["groups"] if g["gid"] % world == rank]
    epochs = cfg["train"]["epochs"]

    local = Path(tempfile.mkdtemp(prefix=f"equiray-groups-{rank}-"))  # this worker's latest group states
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            for g in mine:
                src = Path(d) / f"group-{g['gid']:05d}.pt"
                if src.is_file():
                    shutil.copy(src, local / src.name)
    start_round, restarts = 0, 0
    if ckpt:
        with ckpt.as_directory() as d:
            if (Path(d) / "round.json").is_file():
                progress = json.loads((Path(d) / "round.json").read_text())
                start_round, restarts = progress["completed_rounds"], progress["restarts"] + 1
    done = {}
    for g in mine:
        f = local / f"group-{g['gid']:05d}.pt"
        done[g["gid"]] = torch.load(f, weights_only=True)["epochs_done"] if f.is_file() else 0
    if ckpt:
        say(f"[ensemble] worker {rank}: resumed at round {start_round + 1} from the latest checkpoint "
            f"(epochs done per group: {done})")
    client = MlflowClient(cfg["tracking_uri"]) if rank == 0 else None
    rounds = cfg["rounds"]
    for r in range(start_round, rounds):
        metrics = {"round": r + 1}
        todo = [g for g in mine if done[g["gid"]] < epochs]
        if todo:
            g = todo[0]
            stats = _train_one_epoch(cfg, g, local / f"group-{g['gid']:05d}.pt", spec, x, y, group_obj, device)
            done[g["gid"]] = stats["epochs_done"]
            metrics.update({k: stats[k] for k in ("loss", "accuracy", "member_samples")})
            say(f"[ensemble] worker {rank} round {r + 1}/{rounds}: group {g['gid']} "
                f"({cfg['settings'][g['setting']]['name']}, {len(g['members'])} members) epoch "
                f"{stats['epochs_done']}/{epochs}  loss {stats['loss']:.4f}  acc {stats['accuracy']:.4f}")
            if client is not None:
                client.log_metric(cfg["run_id"], f"train_loss/group{g['gid']:05d}", stats["loss"],
                                  step=stats["epochs_done"])
        with tempfile.TemporaryDirectory() as out:
            for f in local.glob("group-*.pt"):
                shutil.copy(f, Path(out) / f.name)
            if rank == 0:
                (Path(out) / "round.json").write_text(json.dumps({"completed_rounds": r + 1, "restarts": restarts}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))
    shutil.rmtree(local, ignore_errors=True)


# ----------------------------------------------------------------------------------------- driver side
def _ensemble_spec(cfg: EnsembleConfig, setting: SettingConfig, in_chans: int, num_classes: int, size: int,
                   num_members: int, classes: list[str]) -> dict:
    """The registry spec of an ensemble-average model: ``equiray.create_model(**spec)`` rebuilds it."""
    return {"name": "ensemble", "in_chans": in_chans, "num_classes": num_classes,
            "kwargs": {"member": cfg.member.name, "member_kwargs": _member_kwargs(cfg, setting),
                       "num_members": num_members},
            "input_shape": [in_chans, size, size], "classes": classes, "group": cfg.group, "setting": setting.name,
            "data": cfg.data.source}


def _collect(cfg: EnsembleConfig, checkpoint_dir: Path, in_chans: int,
             num_classes: int) -> tuple[dict[int, Any], dict[int, list[str]]]:
    """Every member group from the final checkpoint, checked complete: each member exactly once, all epochs.
    Also returns, per group, the Ray node ids it was trained on (one per epoch)."""
    from equiray.ensembles import MemberSpec, StackedEnsemble

    groups = cfg.member_groups()
    found, nodes = {}, {}
    for g in groups:
        f = checkpoint_dir / f"group-{g['gid']:05d}.pt"
        if not f.is_file():
            raise RuntimeError(f"member group {g['gid']} is missing from the final checkpoint {checkpoint_dir}")
        state = torch.load(f, weights_only=True)
        if state["epochs_done"] != cfg.train.epochs or state["group"]["members"] != g["members"]:
            raise RuntimeError(f"member group {g['gid']} is incomplete: {state['epochs_done']} of "
                               f"{cfg.train.epochs} epochs")
        setting = cfg.settings[g["setting"]]
        spec = MemberSpec(cfg.member.name, _member_kwargs(cfg, setting), in_chans, num_classes)
        ens = StackedEnsemble(spec, len(g["members"]))
        ens.load_state_dict(state["model"])
        found[g["gid"]] = ens
        nodes[g["gid"]] = list(state.get("nodes", []))
    ids = [m for g in groups for m in g["members"]]
    if len(ids) != len(set(ids)) or len(ids) != cfg.members * len(cfg.settings):
        raise RuntimeError("member ids are not unique and complete")
    return found, nodes


def _member_kwargs(cfg: EnsembleConfig, setting: SettingConfig) -> dict:
    """The member model's keyword arguments for one setting (its filter support overrides the member's)."""
    return {**cfg.member.kwargs, "support": setting.support}


def run_train(cfg: EnsembleConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> dict:
    """Train every setting's members on Ray Train, log member groups to MLflow, register the champion.
    With ``reuse``, an ensemble registered by this very config is taken instead of training again."""
    import mlflow
    import ray.data

    from equiray.data import read_split, split_files
    from equiray.ensembles import StackedEnsemble, save_group
    from equiray.train import accuracy, predict
    from pipelines import _tracking
    from pipelines._ray import cluster_summary, init_ray

    t0 = time.perf_counter()
    if cfg.member.name != "small_cnn":
        from equiray.models import is_model

        if not is_model(cfg.member.name):
            raise ConfigError(f"member.name: unknown model {cfg.member.name!r}")
    meta = cfg.data.prepare()
    data_dir = str(Path(cfg.data.dir).resolve())
    c = meta["shape"][2]
    size = cfg.data.resize or meta["shape"][0]
    uri = _tracking.tracking_uri()
    _tracking.setup(cfg.tracking.experiment, uri)
    n_total = cfg.members * len(cfg.settings)
    registered = f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
    if reuse:
        mv = _tracking.find_version(cfg.tracking.registered_model, cfg.tracking.alias,
                                    config_hash_value=_train_hash(cfg))
        if mv is not None:
            metrics = mlflow.MlflowClient().get_run(mv.run_id).data.metrics
            return {"run_id": mv.run_id, "tracking_uri": uri, "members": n_total, "reused": True,
                    "version": str(mv.version), "registered": registered, "champion": mv.tags.get("setting"),
                    "train_seconds": metrics.get("train_seconds", float("nan")), "restarts": 0,
                    "accuracy": {s.name: metrics.get(f"test_accuracy/{_slug(s.name)}") for s in cfg.settings}}
    init_ray()
    log.info("Ray: %s", cluster_summary())
    groups = cfg.member_groups()
    world = cfg.scaling.num_workers
    rounds = max(sum(1 for g in groups if g["gid"] % world == r) for r in range(world)) * cfg.train.epochs
    train_ds = ray.data.read_parquet(split_files(data_dir, "train"))
    if cfg.data.max_train:
        train_ds = train_ds.limit(cfg.data.max_train)
    run_name = cfg.tracking.run_name or f"ensemble-{cfg.group}-{time.strftime('%Y%m%d-%H%M%S')}"
    say(f"[ensemble] {n_total} members ({len(cfg.settings)} settings x {cfg.members}) in {len(groups)} groups of "
        f"<= {cfg.members_per_group}, {world} worker(s), {rounds} rounds")
    with mlflow.start_run(run_name=run_name) as active:
        run_id = active.info.run_id
        _tracking.log_config(cfg)
        mlflow.set_tags({"equiray.pipeline": "ensemble-train", "equiray.group": cfg.group})
        loop_cfg = {**to_dict(cfg), "groups": groups, "rounds": rounds, "num_classes": meta["num_classes"],
                    "run_id": run_id, "tracking_uri": uri}
        result = fit(train_loop_per_worker, loop_cfg, scaling=cfg.scaling, run_name=run_name,
                     storage_path=cfg.storage_path, datasets={"train": train_ds}, max_failures=cfg.max_failures,
                     split_data=False)  # every worker sees all the data
        train_seconds = time.perf_counter() - t0
        with result.checkpoint.as_directory() as d:
            parts, group_nodes = _collect(cfg, Path(d), c, meta["num_classes"])
            restarts = json.loads((Path(d) / "round.json").read_text())["restarts"]
        with tempfile.TemporaryDirectory() as tmp:
            for gid, ens in parts.items():
                g = groups[gid]
                save_group(ens, Path(tmp) / f"group-{gid:05d}.safetensors",
                           meta={"gid": gid, "members": g["members"], "setting": cfg.settings[g["setting"]].name,
                                 "seeds": [_member_seed(cfg.train.seed, m) for m in g["members"]],
                                 "group": cfg.group, "input_size": size, "epochs": cfg.train.epochs,
                                 "nodes": group_nodes[gid]})
            mlflow.log_artifacts(tmp, "members")
        ensembles = {s.name: StackedEnsemble.concat([parts[g["gid"]] for g in groups if g["setting"] == i])
                     for i, s in enumerate(cfg.settings)}
        x, y = read_split(data_dir, "test", limit=cfg.eval.max_eval)
        x = resize(x, size)
        acc = {name: accuracy(predict(ens, x, batch_size=256), y) for name, ens in ensembles.items()}
        mlflow.log_metrics({f"test_accuracy/{_slug(n)}": a for n, a in acc.items()})
        mlflow.log_dict({str(gid): n for gid, n in group_nodes.items()}, "members/nodes.json")
        mlflow.log_metrics({"nodes": len({n for ns in group_nodes.values() for n in ns}),
                            "train_seconds": train_seconds, "members": n_total, "restarts": restarts,
                            "member_epochs_per_second": n_total * cfg.train.epochs / train_seconds})
        champion = cfg.tracking.champion or cfg.settings[0].name
        setting = next(s for s in cfg.settings if s.name == champion)
        spec = _ensemble_spec(cfg, setting, c, meta["num_classes"], size, cfg.members, meta["classes"])
        model_uri = _tracking.log_model(ensembles[champion], spec, name="ensemble")
        version = _tracking.register(model_uri, cfg.tracking.registered_model, cfg.tracking.alias,
                                     tags={"setting": champion, "test_accuracy": f"{acc[champion]:.4f}",
                                           "run_id": run_id, "equiray.config_hash": _train_hash(cfg)})
    say(f"[ensemble] trained {n_total} members in {train_seconds:.0f} s; ensemble test accuracy: " +
        ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return {"run_id": run_id, "run_name": run_name, "tracking_uri": uri, "members": n_total,
            "groups": len(groups), "restarts": restarts, "accuracy": acc, "train_seconds": train_seconds, "version": version,
            "registered": registered, "champion": champion, "reused": False,
            "ensembles": ensembles, "data_dir": data_dir, "input_size": size, "model_uri": model_uri,
            "group_nodes": group_nodes, "group_members": {g["gid"]: g["members"] for g in groups}}


def _train_hash(cfg: EnsembleConfig) -> str:
    """What identifies a trained ensemble: its config without the ``eval`` section (evaluation is redone anyway)."""
    from pipelines import _tracking

    return _tracking.config_hash({k: v for k, v in to_dict(cfg).items() if k != "eval"})


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


# ----------------------------------------------------------------------------------------- evaluation
def off_manifold_images(source: str, size: int, channels: int, limit: int) -> torch.Tensor:
    """Inputs from another dataset, shaped like the members' inputs (the paper's off-manifold check)."""
    from equiray.data import SourceOptions, load_source

    if source == "noise":
        gen = torch.Generator().manual_seed(0)
        return torch.rand(limit, channels, size, size, generator=gen)
    ds = load_source(source, SourceOptions(max_per_split=limit))
    x = torch.from_numpy(ds.images["test"]).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return resize(x, size)[:limit].contiguous()


def load_members(run_id: str) -> tuple[dict[str, Any], list[dict]]:
    """The member groups logged by an ``ensemble train`` run, joined per setting (in member order)."""
    import mlflow

    from equiray.ensembles import StackedEnsemble, load_group

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="members", dst_path=tmp))
        parts = [load_group(f) for f in sorted(local.glob("group-*.safetensors"))]
    if not parts:
        raise EquirayError(f"run {run_id} has no member groups under members/")
    by_setting: dict[str, list] = {}
    for ens, meta in sorted(parts, key=lambda p: p[1]["gid"]):
        by_setting.setdefault(meta["setting"], []).append(ens)
    return {k: StackedEnsemble.concat(v) for k, v in by_setting.items()}, [m for _, m in parts]


def evaluate(ensembles: dict[str, Any], x: torch.Tensor, y: torch.Tensor, x_off: torch.Tensor, group: str, *,
             sizes: tuple[int, ...] = (), repeats: int = 20, seed: int = 0) -> list[dict]:
    """Bootstrap curves of OSP, KL and accuracy per setting, in distribution (``x``) and off-manifold."""
    from equiray.metrics import bootstrap_curve, orbit_logits, size_grid

    g = get_group(group)
    rows = []
    for name, ens in ensembles.items():
        ens.eval()
        grid = list(sizes) or size_grid(ens.num_members)
        for where, inputs, labels in (("in-distribution", x, y), ("off-manifold", x_off, None)):
            logits = orbit_logits(ens.member_logits, inputs, g, batch_size=256)  # (N, |G|, B, K)
            gen = torch.Generator().manual_seed(seed)
            for row in bootstrap_curve(logits, grid, labels=labels, repeats=repeats, generator=gen):
                rows.append({"setting": name, "data": where, **row})
    return rows


def plot_curves(rows: list[dict], path: Path, group: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, metric in enumerate(("osp", "kl")):
        for row_i, where in enumerate(("in-distribution", "off-manifold")):
            ax = axes[row_i, col]
            for setting in dict.fromkeys(r["setting"] for r in rows):
                pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
                if not pts:
                    continue
                xs = [p["size"] for p in pts]
                ys = [p[metric] for p in pts]
                err = [p[f"{metric}_std"] for p in pts]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=setting)
            ax.set_xscale("log")
            ax.set(title=f"{'OSP (higher = more invariant)' if metric == 'osp' else 'symmetric KL (lower = more invariant)'}"
                         f"\n{where}", xlabel="ensemble size", ylabel=metric.upper())
            if metric == "kl":
                ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Invariance of the ensemble mean under {group} vs ensemble size (bootstrap mean +- std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_table(rows: list[dict]) -> str:
    """Markdown: per setting, single member vs the whole ensemble, in and off distribution."""
    out = ["| setting | data | size | accuracy | orbit accuracy | OSP | sym. KL |", "|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for where in ("in-distribution", "off-manifold"):
            pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
            for p in (pts[0], pts[-1]) if len(pts) > 1 else pts:
                acc = f"{p['accuracy'] * 100:.1f}%" if "accuracy" in p else "-"
                oacc = f"{p['orbit_accuracy'] * 100:.1f}%" if "orbit_accuracy" in p else "-"
                out.append(f"| {setting} | {where} | {p['size']} | {acc} | {oacc} | {p['osp']:.3f} / {p['orbit_size']} "
                           f"| {p['kl']:.4f} |")
    return "\n".join(out)


def verdict(rows: list[dict]) -> list[str]:
    """Plain statements of whether the paper's finding shows in these numbers."""
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for where in ("in-distribution", "off-manifold"):
            pts = [r for r in rows if r["setting"] == setting and r["data"] == where]
            if len(pts) < 2:
                continue
            first, last = pts[0], pts[-1]
            change = last["kl"] / max(first["kl"], 1e-12)
            lines.append(f"- {setting}, {where}: KL {first['kl']:.4f} (1 member) -> {last['kl']:.4f} "
                         f"({last['size']} members), x{change:.2f}; OSP {first['osp']:.2f} -> {last['osp']:.2f}")
    return lines


def run_eval(cfg: EnsembleConfig, *, run_id: str | None = None, report_dir: str | os.PathLike | None = None,
             ensembles: dict | None = None) -> dict:
    """Measure the members of an ``ensemble train`` run (default: the latest in the experiment)."""
    import mlflow

    from equiray.data import read_split
    from pipelines import _tracking

    uri = _tracking.tracking_uri()
    _tracking.setup(cfg.tracking.experiment, uri)
    run_id = find_train_run(cfg.tracking.experiment, run_id)
    metanet = None
    if cfg.eval.select_by == "nfn":
        metanet = _tracking.load_model(cfg.eval.nfn_model)  # fails early and clearly when none is registered
    if ensembles is None:
        ensembles, _ = load_members(run_id)
    meta = cfg.data.prepare()
    size = cfg.data.resize or meta["shape"][0]
    x, y = read_split(str(Path(cfg.data.dir).resolve()), "test", limit=cfg.eval.max_eval)
    x = resize(x, size)
    x_off = off_manifold_images(cfg.eval.off_manifold, size, meta["shape"][2], cfg.eval.max_off_manifold)
    rows = evaluate(ensembles, x, y, x_off, cfg.group, sizes=cfg.eval.sizes, repeats=cfg.eval.repeats)
    out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-ensemble-eval-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(rows, out_dir / "ensemble_invariance.png", cfg.group)
    table = results_table(rows)
    (out_dir / "ensemble_table.md").write_text(table + "\n")
    (out_dir / "ensemble_curves.json").write_text(json.dumps(rows, indent=1))
    with mlflow.start_run(run_id=run_id):
        for f in (plot, out_dir / "ensemble_table.md", out_dir / "ensemble_curves.json"):
            mlflow.log_artifact(str(f), "eval")
        for r in rows:
            key = f"{_slug(r['setting'])}/{'id' if r['data'] == 'in-distribution' else 'off'}"
            mlflow.log_metric(f"osp/{key}", r["osp"], step=r["size"])
            mlflow.log_metric(f"kl/{key}", r["kl"], step=r["size"])
    result = {"run_id": run_id, "rows": rows, "table": table, "plot": str(plot), "verdict": verdict(rows)}
    if cfg.eval.select_by == "nfn":
        sel = run_select(cfg, run_id=run_id, ensembles=ensembles, report_dir=out_dir, data=(x, y), metanet=metanet)
        result["selection"] = sel["selection"]
        result["table"] = table + "\n\n" + sel["table"]
    return result


def run_select(cfg: EnsembleConfig, *, run_id: str | None = None, ensembles: dict | None = None,
               report_dir: str | os.PathLike | None = None, data: tuple | None = None,
               metanet: tuple | None = None) -> dict:
    """``--select-by nfn`` on its own: leave out the members ``cfg.eval.nfn_model`` predicts weakest, compare the
    mean of the rest with all members and with random subsets; table to ``report_dir`` and to the run."""
    import mlflow

    from equiray.data import read_split
    from pipelines import _tracking

    _tracking.setup(cfg.tracking.experiment)
    run_id = find_train_run(cfg.tracking.experiment, run_id)
    metanet, meta_spec = metanet or _tracking.load_model(cfg.eval.nfn_model)  # (model, spec) already loaded?
    if ensembles is None:
        ensembles, _ = load_members(run_id)
    if data is None:
        meta = cfg.data.prepare()
        x, y = read_split(str(Path(cfg.data.dir).resolve()), "test", limit=cfg.eval.max_eval)
        data = (resize(x, cfg.data.resize or meta["shape"][0]), y)
    selection = select_by_nfn(ensembles, metanet, meta_spec, *data, cfg.group, drop_fraction=cfg.eval.drop_fraction)
    table = selection_table(selection, cfg.eval.nfn_model)
    out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-ensemble-eval-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ensemble_selection.md").write_text(table + "\n")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(out_dir / "ensemble_selection.md"), "eval")
        for r in selection:
            for k in ("accuracy", "orbit_accuracy", "osp", "kl"):
                mlflow.log_metric(f"select/{_slug(r['setting'])}/{_slug(r['members'].split()[0])}/{k}", r[k])
    return {"run_id": run_id, "selection": selection, "table": table, "verdict": selection_verdict(selection)}


def selection_verdict(rows: list[dict]) -> list[str]:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        full, nfn, rand = [r for r in rows if r["setting"] == setting]
        lines.append(f"- {setting}: {nfn['members']} by predicted accuracy {nfn['accuracy'] * 100:.1f}% vs "
                     f"{full['members']} {full['accuracy'] * 100:.1f}% vs {rand['members']} "
                     f"{rand['accuracy'] * 100:.1f}%; KL {nfn['kl']:.4f} vs {full['kl']:.4f} vs {rand['kl']:.4f}")
    return lines


def find_train_run(experiment: str, run_id: str | None = None) -> str:
    """``run_id``, or the latest finished ``ensemble train`` run in ``experiment``."""
    import mlflow

    if run_id is not None:
        return run_id
    exp = mlflow.get_experiment_by_name(experiment)
    runs = [] if exp is None else mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`equiray.pipeline` = 'ensemble-train' and attributes.status = "
        "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        raise EquirayError(f"no finished `equiray ensemble train` run in experiment {experiment!r}; train one first "
                           "or pass --run-id")
    return runs[0].info.run_id


def member_state_dicts(ens) -> list[dict[str, torch.Tensor]]:
    """Every member's own state dict, out of the stacked ensemble."""
    params, _ = ens._stacked()
    return [{n: p[m].detach().cpu() for n, p in params.items()} for m in range(ens.num_members)]


def select_by_nfn(ensembles: dict, metanet, meta_spec: dict, x: torch.Tensor, y: torch.Tensor, group: str, *,
                  drop_fraction: float, random_repeats: int = 10, seed: int = 0) -> list[dict]:
    """Per setting: the whole ensemble, the members a metanetwork predicts strongest (the weakest ``drop_fraction``
    left out), and random subsets of the same size (the control); accuracy and invariance of each mean."""
    from equiray.metrics import invariance, orbit_logits
    from equiray.nfn import features_from_normalized_cnns, predict

    g = get_group(group)
    rows = []
    for name, ens in ensembles.items():
        try:
            feats, spec = features_from_normalized_cnns(member_state_dicts(ens))
        except EquirayError as exc:
            raise EquirayError(f"--select-by nfn reads small_cnn members; {name!r}: {exc}") from None
        expected = [list(map(int, [o, i])) + [list(k)] for o, i, k in
                    ((layer.out_features, layer.in_features, layer.kernel_size) for layer in spec.layers)]
        if meta_spec.get("network_spec") != expected or meta_spec.get("kwargs", {}).get("in_channels", 1) != 2:
            raise EquirayError(f"{meta_spec.get('name')} ({meta_spec.get('network_spec')}) was not trained on members "
                               f"like these ({expected}); train one on this run's members: equiray nfn zoo --set "
                               "from_ensemble=latest --set out=data/member-zoo, then equiray nfn train --set "
                               "zoo=data/member-zoo")
        with torch.no_grad():
            score = predict(metanet, feats)
            logits = orbit_logits(ens.member_logits, x, g, batch_size=256)  # (N, |G|, B, K)
        keep = max(1, round(ens.num_members * (1 - drop_fraction)))
        chosen = torch.argsort(score, descending=True)[:keep]
        rows.append({"setting": name, "members": f"all {ens.num_members}", **invariance(_mean_of(logits, None), y)})
        rows.append({"setting": name, "members": f"nfn top {keep}", **invariance(_mean_of(logits, chosen), y)})
        gen = torch.Generator().manual_seed(seed)
        rand = [invariance(_mean_of(logits, torch.randperm(ens.num_members, generator=gen)[:keep]), y)
                for _ in range(random_repeats)]
        rows.append({"setting": name, "members": f"random {keep}",
                     **{k: float(sum(r[k] for r in rand) / len(rand)) for k in rand[0]},
                     "orbit_size": rand[0]["orbit_size"]})
    return rows


def _mean_of(member_orbit_logits: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The ensemble mean's orbit logits (|G|, B, K) over the members ``idx`` (all when None)."""
    return (member_orbit_logits if idx is None else member_orbit_logits[idx]).mean(0)


def selection_table(rows: list[dict], model: str) -> str:
    out = [f"Members chosen by {model} (predicted accuracy from weights) vs all and vs random subsets of the "
           "same size:", "", "| setting | members | accuracy | orbit accuracy | OSP | sym. KL |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['members']} | {r['accuracy'] * 100:.1f}% | {r['orbit_accuracy'] * 100:.1f}% "
                   f"| {r['osp']:.3f} / {r['orbit_size']} | {r['kl']:.4f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import run_pipeline_main

    return run_pipeline_main("ensemble", argv)


if __name__ == "__main__":
    raise SystemExit(main())
