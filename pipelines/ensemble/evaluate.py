"""``equiray ensemble eval``: OSP and symmetric KL (and accuracy) of the ensemble mean vs ensemble size.

Per setting, bootstrap subsets of each size (``eval.sizes``, default 1, 2, 5, 10, ... up to all members) are
measured in distribution (the test set) and off the data manifold (another dataset, or noise); one line per
setting in the plot, single member vs the whole ensemble in the table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.groups import get_group
from equiray.data import resize
from equiray_pipelines.ensemble.config import EnsembleConfig
from equiray_pipelines.ensemble.members import find_train_run, load_members, read_test
from equiray_pipelines.ensemble.report import plot_curves, results_table, slug, verdict
from equiray_pipelines.ensemble.select import run_select
from equiray_pipelines.stage import StageResult


@dataclass(frozen=True, kw_only=True)
class EnsembleEvalResult(StageResult):
    pipeline: str = "ensemble-eval"
    # one row per setting, data ("in-distribution" / "off-manifold") and size: osp, kl, accuracy, ... (+ _std)
    rows: tuple[dict, ...] = ()
    selection: tuple[dict, ...] | None = None  # with eval.select_by nfn: EnsembleSelectResult.selection

    @property
    def plot(self) -> str:
        """The invariance-vs-size plot."""
        return self.plots[0]


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


def evaluate(ensembles: dict, x: torch.Tensor, y: torch.Tensor, x_off: torch.Tensor, group: str, *,
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


def run_eval(cfg: EnsembleConfig, *, run_id: str | None = None, report_dir: str | os.PathLike | None = None,
             ensembles: dict | None = None) -> EnsembleEvalResult:
    """Measure the members of an ``ensemble train`` run (default: the latest in the experiment). ``ensembles``
    (an :class:`~equiray_pipelines.ensemble.stage.EnsembleTrainResult`'s, when it has them) saves reading them again."""
    import mlflow

    from equiray_pipelines import tracking

    uri = tracking.require_store(tracking.tracking_uri())  # reads a run: no new empty store
    tracking.setup(cfg.tracking.experiment, uri)
    run_id = find_train_run(cfg.tracking.experiment, run_id)
    metanet = None
    if cfg.eval.select_by == "nfn":
        metanet = tracking.load_model(cfg.eval.nfn_model)  # fails early and clearly when none is registered
    if ensembles is None:
        ensembles, _ = load_members(run_id)
    x, y, meta = read_test(cfg)
    size = cfg.data.resize or meta["shape"][0]
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
            key = f"{slug(r['setting'])}/{'id' if r['data'] == 'in-distribution' else 'off'}"
            mlflow.log_metric(f"osp/{key}", r["osp"], step=r["size"])
            mlflow.log_metric(f"kl/{key}", r["kl"], step=r["size"])
    result = EnsembleEvalResult(run_id=run_id, tracking_uri=uri, rows=tuple(rows), table=table,
                                verdict=tuple(verdict(rows)), plots=(str(plot),))
    if cfg.eval.select_by == "nfn":
        sel = run_select(cfg, run_id=run_id, ensembles=ensembles, report_dir=out_dir, data=(x, y), metanet=metanet)
        result = dataclasses.replace(result, selection=sel.selection, table=table + "\n\n" + sel.table)
    return result
