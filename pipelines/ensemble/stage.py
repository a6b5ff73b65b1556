"""``equiray ensemble train``: the stage that trains every setting's members on Ray Train and registers the champion.

After the workers finish, the driver reads every member group from the final checkpoint (checked complete:
each member exactly once, all epochs), logs each group to MLflow (``members/group-NNNNN.safetensors``, loadable
on its own), measures each setting's ensemble mean on the test set and registers the champion setting's.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from equiray.config import to_dict
from equiray.ensembles import MemberGroup, StackedEnsemble, member_seed, save_group
from equiray.errors import ConfigError
from equiray.data import resize
from equiray_pipelines._common import fit
from equiray_pipelines._ray import say
from equiray_pipelines.ensemble.config import EnsembleConfig, GroupPlan, SettingConfig
from equiray_pipelines.ensemble.report import slug
from equiray_pipelines.ensemble.worker import WorkerRun, group_file, train_loop_per_worker
from equiray_pipelines.stage import Outcome, Stage, StageResult, StageRun


@dataclass(frozen=True, kw_only=True)
class EnsembleTrainResult(StageResult):
    pipeline: str = "ensemble-train"
    members: int  # all settings together
    groups: int
    restarts: int = 0  # worker-group restarts Ray Train did (0 when reused)
    accuracy: dict[str, float | None] = field(default_factory=dict)  # each setting's ensemble mean, test set
    train_seconds: float = float("nan")
    champion: str | None = None  # the setting registered
    data_dir: str = ""
    input_size: int = 0
    group_nodes: dict[int, list[str]] = field(default_factory=dict)  # Ray node of every epoch, per group
    group_members: dict[int, list[int]] = field(default_factory=dict)  # member ids per group
    # where the stage's time went, in seconds: "fit" (Ray Train: workers started, data read, every round and its
    # checkpoint), of which rank 0's "worker_train" / "worker_group_io" / "worker_checkpoint"; then the driver's
    # "collect" (the final checkpoint's groups read and checked), "log_members", "evaluate", "log_model"
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # the trained members per setting, joined in member order; None when reused (read them with load_members)
    ensembles: dict[str, StackedEnsemble] | None = field(default=None, repr=False, compare=False)


def train_hash(cfg: EnsembleConfig) -> dict:
    """What identifies a trained ensemble: its config without the ``eval`` section (evaluation is redone anyway)."""
    return {k: v for k, v in to_dict(cfg).items() if k != "eval"}


class EnsembleTrain(Stage[EnsembleConfig, EnsembleTrainResult]):
    pipeline = "ensemble-train"

    def check(self) -> None:
        self._started = time.perf_counter()  # train_seconds counts data preparation and Ray's start too
        self.pretrained = None  # (state dict, registry spec) of the model strong members copy
        if self.cfg.member.init_from is not None:
            self.pretrained = self._pretrained(self.cfg.member.init_from)
        elif self.cfg.member.name != "small_cnn":
            from equiray.models import is_model

            if not is_model(self.cfg.member.name):
                raise ConfigError(f"member.name: unknown model {self.cfg.member.name!r}")
        self.meta = self.cfg.data.check()
        self.data_dir = str(Path(self.cfg.data.dir).resolve())
        self.size = self.cfg.data.resize or self.meta["shape"][0]

    def fingerprint(self) -> dict:
        if self.cfg.member.init_from is None:
            return train_hash(self.cfg)
        from equiray_pipelines import tracking

        return {**train_hash(self.cfg), "init_from": tracking.registry_version(self.cfg.member.init_from)}

    def _pretrained(self, uri: str) -> tuple[dict, dict]:
        """The registered model every member copies: its state dict (BatchNorm folded when ``member.frozen_bn``)
        and its registry spec; a clear error now if it cannot be a member."""
        import torch

        from equiray.models import freeze_batchnorm
        from equiray_pipelines import tracking

        model, spec = tracking.load_model(uri)
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and not self.cfg.member.frozen_bn:
            raise ConfigError(f"member.init_from {uri} ({spec['name']}) uses BatchNorm, which members cannot stack; "
                              "set member.frozen_bn: true to fold it into trainable affine maps")
        model = freeze_batchnorm(model) if self.cfg.member.frozen_bn else model
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, spec

    def member_spec(self, setting: SettingConfig):
        return self.cfg.member_spec(setting, in_chans=self.meta["shape"][2], num_classes=self.meta["num_classes"],
                                    pretrained_spec=self.pretrained[1] if self.pretrained else None)

    def tags(self) -> dict[str, str]:
        return {"equiray.group": self.cfg.group}

    def calibration_images(self) -> int:
        """An ensemble's forward pass costs ``members`` nets per image: its temperature is fitted on as many
        validation images as its test accuracy is measured on (``eval.max_eval``), at most the default's."""
        return min(super().calibration_images(), self.cfg.eval.max_eval)

    def default_run_name(self) -> str:
        return f"ensemble-{self.cfg.group}-{time.strftime('%Y%m%d-%H%M%S')}"

    def from_registry(self, mv, run: StageRun) -> EnsembleTrainResult:
        import mlflow

        cfg = self.cfg
        metrics = mlflow.MlflowClient().get_run(mv.run_id).data.metrics
        return EnsembleTrainResult(
            run_id=mv.run_id, tracking_uri=run.tracking_uri, members=cfg.members * len(cfg.settings),
            groups=len(cfg.member_groups()), champion=mv.tags.get("setting"),
            train_seconds=metrics.get("train_seconds", float("nan")),
            accuracy={s.name: metrics.get(f"test_accuracy/{slug(s.name)}") for s in cfg.settings},
            data_dir=self.data_dir, input_size=self.size,
            group_members={g.gid: list(g.members) for g in cfg.member_groups()})

    def execute(self, run: StageRun) -> Outcome[EnsembleTrainResult]:
        import mlflow

        from equiray.data import apply_view, read_split
        from equiray.train import accuracy, predict
        from equiray_pipelines import tracking

        cfg, groups = self.cfg, self.cfg.member_groups()
        phases: dict[str, float] = {}
        trained, restarts = self._train(run, groups, phases)
        train_seconds = time.perf_counter() - self._started
        with _timed(phases, "log_members"):
            self._log_groups(groups, trained)
        with _timed(phases, "evaluate"):
            ensembles = {s.name: StackedEnsemble.concat([trained[g.gid].ensemble for g in groups if g.setting == i])
                         for i, s in enumerate(cfg.settings)}
            x, y = read_split(self.data_dir, "test", limit=cfg.eval.max_eval)
            x = resize(x, self.size)
            acc = {name: accuracy(predict(ens, x, batch_size=256), y) for name, ens in ensembles.items()}
            # a setting trained on random rotations is also measured on them (the so2 / o2 views, seed 0)
            turned = {s.name: accuracy(predict(ensembles[s.name], apply_view(x, s.rotations), batch_size=256), y)
                      for s in cfg.settings if s.rotations != "none"}
        mlflow.log_metrics({f"test_accuracy/{slug(n)}": a for n, a in acc.items()})
        mlflow.log_metrics({f"test_accuracy_{s.rotations}/{slug(s.name)}": turned[s.name]
                            for s in cfg.settings if s.name in turned})
        group_nodes = {gid: grp.nodes for gid, grp in trained.items()}
        mlflow.log_dict({str(gid): n for gid, n in group_nodes.items()}, "members/nodes.json")
        n_total = cfg.members * len(cfg.settings)
        mlflow.log_metrics({"nodes": len({n for ns in group_nodes.values() for n in ns}),
                            "train_seconds": train_seconds, "members": n_total, "restarts": restarts,
                            "member_epochs_per_second": n_total * cfg.train.epochs / train_seconds})
        champion = cfg.tracking.champion or cfg.settings[0].name
        setting = next(s for s in cfg.settings if s.name == champion)
        with _timed(phases, "log_model"):
            model_uri = tracking.log_model(ensembles[champion], self._registry_spec(setting), name="ensemble")
        mlflow.log_metrics({f"seconds/{k}": v for k, v in phases.items()})
        say(f"[ensemble] trained {n_total} members in {train_seconds:.0f} s; ensemble test accuracy: " +
            ", ".join(f"{k} {v:.3f}" + (f" (at a random angle {turned[k]:.3f})" if k in turned else "")
                      for k, v in acc.items()))
        result = EnsembleTrainResult(
            run_id=run.run_id, run_name=run.run_name, tracking_uri=run.tracking_uri, members=n_total,
            groups=len(groups), restarts=restarts, accuracy=acc, train_seconds=train_seconds, champion=champion,
            ensembles=ensembles, data_dir=self.data_dir, input_size=self.size, group_nodes=group_nodes,
            group_members={g.gid: list(g.members) for g in groups}, phase_seconds=phases)
        return Outcome(result, model_uri, tags={"setting": champion, "test_accuracy": f"{acc[champion]:.4f}",
                                                "run_id": run.run_id})

    # ------------------------------------------------------------------------------ the parts of execute
    def _train(self, run: StageRun, groups: list[GroupPlan],
               phases: dict[str, float]) -> tuple[dict[int, MemberGroup], int]:
        """Every member group trained on Ray Train -> ``(the groups by id, worker-group restarts)``; the time
        of its parts goes into ``phases``."""
        import ray.data

        from equiray.data import split_files

        cfg = self.cfg
        world = cfg.scaling.num_workers
        rounds = max(sum(1 for g in groups if g.gid % world == r) for r in range(world)) * cfg.train.epochs
        train_ds = ray.data.read_parquet(split_files(self.data_dir, "train"))
        if cfg.data.max_train:
            train_ds = train_ds.limit(cfg.data.max_train)
        say(f"[ensemble] {cfg.members * len(cfg.settings)} members ({len(cfg.settings)} settings x {cfg.members}) "
            f"in {len(groups)} groups of <= {cfg.members_per_group}, {world} worker(s), {rounds} rounds")
        worker_run = WorkerRun(run.run_id, run.tracking_uri, self.meta["num_classes"], tuple(groups), rounds,
                               specs=tuple(self.member_spec(s) for s in cfg.settings),
                               pretrained=self.pretrained[0] if self.pretrained else None)
        with _timed(phases, "fit"):
            result = fit(train_loop_per_worker, {"cfg": cfg, "run": worker_run}, scaling=cfg.scaling,
                         run_name=run.run_name, storage_path=cfg.storage_path, datasets={"train": train_ds},
                         data_dir=self.data_dir, max_failures=cfg.max_failures, split_data=False)  # every worker sees all the data
        phases.update({k.removesuffix("_seconds"): float(v) for k, v in (result.metrics or {}).items()
                       if k.startswith("worker_") and k.endswith("_seconds")})
        with _timed(phases, "collect"), result.checkpoint.as_directory() as d:
            trained = collect(cfg, groups, Path(d))
            restarts = json.loads((Path(d) / "round.json").read_text())["restarts"]
        return trained, restarts

    def _log_groups(self, groups: list[GroupPlan], trained: dict[int, MemberGroup]) -> None:
        """Every member group as ``members/group-NNNNN.safetensors`` (+ ``.json``) of the run."""
        import mlflow

        cfg = self.cfg
        with tempfile.TemporaryDirectory() as tmp:
            for g in groups:
                grp = trained[g.gid]
                save_group(grp.ensemble, Path(tmp) / f"group-{g.gid:05d}.safetensors",
                           meta={"gid": g.gid, "members": list(g.members), "setting": cfg.settings[g.setting].name,
                                 "seeds": list(grp.seeds), "group": cfg.group, "input_size": self.size,
                                 "epochs": cfg.train.epochs, "nodes": grp.nodes})
            mlflow.log_artifacts(tmp, "members")

    def _registry_spec(self, setting: SettingConfig) -> dict:
        """The registry spec of an ensemble-average model: ``equiray.create_model(**spec)`` rebuilds it."""
        cfg, c = self.cfg, self.meta["shape"][2]
        member = self.member_spec(setting)
        return {"name": "ensemble", "in_chans": c, "num_classes": self.meta["num_classes"],
                "kwargs": {"member": member.name, "member_kwargs": member.kwargs, "num_members": cfg.members,
                           **({"member_frozen_bn": True} if member.frozen_bn else {})},
                "input_shape": [c, self.size, self.size], "classes": self.meta["classes"], "group": cfg.group,
                "setting": setting.name, "data": cfg.data.source}


@contextmanager
def _timed(phases: dict[str, float], name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t


def collect(cfg: EnsembleConfig, groups: list[GroupPlan], checkpoint_dir: Path) -> dict[int, MemberGroup]:
    """Every member group from the final checkpoint, checked complete: each member exactly once, all epochs."""
    found = {}
    for g in groups:
        f = checkpoint_dir / group_file(g.gid)
        if not f.is_file():
            raise RuntimeError(f"member group {g.gid} is missing from the final checkpoint {checkpoint_dir}")
        grp = MemberGroup.load(f)
        if grp.epochs_done != cfg.train.epochs:
            raise RuntimeError(f"member group {g.gid} is incomplete: {grp.epochs_done} of {cfg.train.epochs} epochs")
        if grp.seeds != tuple(member_seed(cfg.train.seed, m) for m in g.members):
            raise RuntimeError(f"member group {g.gid} in the checkpoint holds other members than {list(g.members)}")
        found[g.gid] = grp
    ids = [m for g in groups for m in g.members]
    if len(ids) != len(set(ids)) or len(ids) != cfg.members * len(cfg.settings):
        raise RuntimeError("member ids are not unique and complete")
    return found


def run_train(cfg: EnsembleConfig, *, report_dir: str | os.PathLike | None = None,
              reuse: bool = False) -> EnsembleTrainResult:
    """Train every setting's members on Ray Train, log member groups to MLflow, register the champion.
    With ``reuse``, an ensemble registered by this very config is taken instead of training again."""
    return EnsembleTrain(cfg, report_dir=report_dir, reuse=reuse).run()
