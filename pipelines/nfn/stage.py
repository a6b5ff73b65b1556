"""``equiray nfn train``: fit every metanetwork on every zoo (plain, scaled) as Ray tasks, log the curves and the
held-out Kendall tau, register the champion (or, with ``reuse``, report the one this same config and zoo
registered before)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from equiray.config import to_dict
from equiray.errors import EquirayError
from equiray.nfn import NetworkSpec, WeightSpaceFeatures
from equiray_pipelines import tracking
from equiray_pipelines.nfn.config import NFNTrainConfig
from equiray_pipelines.nfn.metanet import MetanetworkFit, champion, fit_task, rebuild
from equiray_pipelines.nfn.report import scatter, tau_table, taus, verdict
from equiray_pipelines.nfn.zoo import read_zoo, scaled_zoo, split_nets, zoo_features
from equiray_pipelines.stage import Outcome, Stage, StageResult, StageRun


@dataclass(frozen=True, kw_only=True)
class NFNTrainResult(StageResult):
    results: tuple[MetanetworkFit, ...]  # one per (metanetwork, zoo), zoo-major; without their weights
    tau: dict[str, float]  # held-out Kendall tau by "metanetwork/zoo"
    champion: str  # the registered metanetwork's name
    plot: str  # nfn_scatter.png: predicted vs true accuracy of the held-out nets


@dataclass(frozen=True)
class ZooInputs:
    """The zoo as the metanetworks read it: its rows, features, spec, symmetry group, targets and splits."""

    rows: list[dict]
    feats: WeightSpaceFeatures
    spec: NetworkSpec
    group: str
    targets: torch.Tensor
    splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # train, validation, test net indices


class NFNTrain(Stage[NFNTrainConfig, NFNTrainResult]):
    pipeline = "nfn-train"

    @cached_property
    def inputs(self) -> ZooInputs:
        """The zoo read (and filtered to ``cfg.activation``): fails clearly when it is missing or unfit."""
        cfg = self.cfg
        rows, states = read_zoo(cfg.zoo)
        if cfg.activation is not None:
            keep = [i for i, r in enumerate(rows) if r.get("activation") == cfg.activation]
            if not keep:
                raise EquirayError(f"no {cfg.activation} nets in the zoo at {cfg.zoo}")
            rows, states = [rows[i] for i in keep], [states[i] for i in keep]
        feats, spec, group = zoo_features(states, rows)
        targets = torch.tensor([r["test_accuracy"] for r in rows], dtype=torch.float32)
        splits = split_nets(len(rows), test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed)
        return ZooInputs(rows, feats, spec, group, targets, splits)

    def check(self) -> None:
        self.inputs  # noqa: B018 (reads the zoo: a missing or unfit one fails here, before anything starts)

    def fingerprint(self) -> Any:
        """The config (metanetworks as the YAML gives them) and the zoo's metadata."""
        meta = Path(self.cfg.zoo) / "zoo.json"
        zoo_meta = meta.read_text() if meta.exists() else str(len(self.inputs.rows))
        return {"config": {**to_dict(self.cfg), "metanetworks": self.cfg.metanetworks.as_dict()}, "zoo": zoo_meta}

    def tags(self) -> dict[str, str]:
        return {"equiray.zoo": str(Path(self.cfg.zoo).resolve())}

    def execute(self, run: StageRun) -> Outcome[NFNTrainResult]:
        import mlflow

        cfg, zoo = self.cfg, self.inputs
        train_idx, _, test_idx = zoo.splits
        mlflow.log_params({"zoo_nets": len(zoo.rows), "train_nets": len(train_idx), "test_nets": len(test_idx)})
        fits = self._fit_all()
        best = champion(fits)
        for f in fits:
            mlflow.log_metric(f"test_tau/{f.name}/{f.zoo}", f.test_tau)
        plot = scatter(fits, run.report_dir)
        table = tau_table(fits)
        mlflow.log_artifact(str(plot))
        mlflow.log_text(table, "nfn_table.md")
        mlflow.log_text(json.dumps([f.record() for f in fits]), "nfn_results.json")
        model_spec = {"builder": "metanetwork", "name": best.name, "kwargs": best.options,
                      "network_spec": [[s.out_features, s.in_features, list(s.kernel_size)] for s in zoo.spec.layers],
                      "target": "test_accuracy", "target_mean": best.mean, "target_std": best.std,
                      "trained_on": best.zoo, "group": zoo.group}
        model_uri = tracking.log_model(rebuild(best, zoo.spec), model_spec, name="metanetwork")
        if run.report_dir:
            run.report_dir.mkdir(parents=True, exist_ok=True)
            (run.report_dir / "nfn_table.md").write_text(table + "\n")
        result = self._result(fits, plot, run_id=run.run_id, run_name=run.run_name, tracking_uri=run.tracking_uri)
        return Outcome(result, model_uri, tags={"run_id": run.run_id, "metanetwork": best.name,
                                                "test_tau": f"{best.test_tau:.4f}"})

    def _fit_all(self) -> list[MetanetworkFit]:
        """One Ray task per (metanetwork, zoo); each finished fit logged as a nested MLflow run."""
        import mlflow
        import ray

        from equiray_pipelines._ray import say

        cfg, zoo = self.cfg, self.inputs
        data = {"plain": zoo.feats}
        if "scaled" in cfg.zoos:
            data["scaled"] = scaled_zoo(zoo.feats, zoo.spec, group=zoo.group, max_scale=cfg.max_scale,
                                        seed=cfg.seed + 1)
        task = ray.remote(fit_task).options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None)
        names = cfg.metanetworks.names()
        pending = {task.remote(name, z, data[z], zoo.spec, zoo.group, zoo.targets, zoo.splits, cfg): (name, z)
                   for z in cfg.zoos for name in names}
        total, fits, t0 = len(pending), [], time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            fit = ray.get(ready[0])
            pending.pop(ready[0])
            say(f"[nfn train] {fit.name} on the {fit.zoo} zoo: test tau {fit.test_tau:.3f} "
                f"({len(fits) + 1}/{total}, {time.perf_counter() - t0:.0f} s)")
            with mlflow.start_run(run_name=f"{fit.name}-{fit.zoo}", nested=True):
                mlflow.log_params({"metanetwork": fit.name, "zoo": fit.zoo, "parameters": fit.params,
                                   **{f"options.{k}": v for k, v in fit.options.items()}})
                for rec in fit.history:
                    mlflow.log_metrics({"train_loss": rec["train_loss"], "val_tau": rec["val_tau"]}, step=rec["epoch"])
                mlflow.log_metrics({"test_tau": fit.test_tau, "train_seconds": fit.seconds,
                                    "best_epoch": fit.best_epoch})
            fits.append(fit)
        return sorted(fits, key=lambda f: (list(cfg.zoos).index(f.zoo), names.index(f.name)))

    def _result(self, fits: list[MetanetworkFit], plot: Path, **run: str) -> NFNTrainResult:
        return NFNTrainResult(pipeline=self.pipeline, **run, table=tau_table(fits), verdict=verdict(fits),
                              plots=(str(plot),), results=tuple(dataclasses.replace(f, state=None) for f in fits),
                              tau=taus(fits), champion=champion(fits).name, plot=str(plot))

    def calibration_view(self, outcome: Outcome) -> None:
        """A metanetwork reads network weights and predicts a number: no softmax to calibrate."""
        return None

    def from_registry(self, mv, run: StageRun) -> NFNTrainResult:
        records, plot = tracking.fetch_results(mv.run_id, "nfn_results.json", "nfn_scatter.png", run.report_dir)
        fits = [MetanetworkFit.from_record(r) for r in records]
        return self._result(fits, plot, run_id=mv.run_id, run_name="", tracking_uri=run.tracking_uri)


def run_train(cfg: NFNTrainConfig, *, report_dir: str | os.PathLike | None = None,
              reuse: bool = False) -> NFNTrainResult:
    """Fit every metanetwork on every zoo as Ray tasks; log, plot, register the champion. With ``reuse``, the
    champion registered by this very config and zoo is reported instead of fitted again."""
    return NFNTrain(cfg, report_dir=report_dir, reuse=reuse).run()
