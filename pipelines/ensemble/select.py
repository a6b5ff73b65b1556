"""``equiray ensemble eval --select-by nfn``: leave out the members a metanetwork predicts weakest.

A registered metanetwork (``eval.nfn_model``, trained on a zoo of members) predicts every member's accuracy from
its weights alone; the mean of the members it ranks strongest is compared with the whole ensemble and with
random subsets of the same size (the control).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.ensembles import StackedEnsemble
from equiray.errors import EquirayError
from equiray.groups import get_group
from equiray_pipelines.ensemble.config import EnsembleConfig
from equiray_pipelines.ensemble.members import find_train_run, load_members, read_test
from equiray_pipelines.ensemble.report import selection_table, selection_verdict, slug
from equiray_pipelines.stage import StageResult


@dataclass(frozen=True, kw_only=True)
class EnsembleSelectResult(StageResult):
    pipeline: str = "ensemble-select"
    # per setting: "all N", "nfn top K", "random K" rows of accuracy, orbit_accuracy, osp, orbit_size, kl
    selection: tuple[dict, ...] = ()


def member_state_dicts(ens: StackedEnsemble) -> list[dict[str, torch.Tensor]]:
    """Every member's own state dict (parameters), out of the stacked ensemble."""
    params, _ = ens.stacked_state()
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


def run_select(cfg: EnsembleConfig, *, run_id: str | None = None, ensembles: dict | None = None,
               report_dir: str | os.PathLike | None = None, data: tuple | None = None,
               metanet: tuple | None = None) -> EnsembleSelectResult:
    """``--select-by nfn`` on its own: leave out the members ``cfg.eval.nfn_model`` predicts weakest, compare the
    mean of the rest with all members and with random subsets; table to ``report_dir`` and to the run.
    ``ensembles`` (an :class:`~equiray_pipelines.ensemble.stage.EnsembleTrainResult`'s), ``data`` (test images and
    labels) and ``metanet`` (``(model, spec)``) save reading them again."""
    import mlflow

    from equiray_pipelines import tracking

    uri = tracking.require_store(tracking.tracking_uri())  # reads a run: no new empty store
    tracking.setup(cfg.tracking.experiment, uri)
    run_id = find_train_run(cfg.tracking.experiment, run_id)
    metanet, meta_spec = metanet or tracking.load_model(cfg.eval.nfn_model)  # (model, spec) already loaded?
    if ensembles is None:
        ensembles, _ = load_members(run_id)
    if data is None:
        data = read_test(cfg)[:2]
    selection = select_by_nfn(ensembles, metanet, meta_spec, *data, cfg.group, drop_fraction=cfg.eval.drop_fraction)
    table = selection_table(selection, cfg.eval.nfn_model)
    out_dir = Path(report_dir) if report_dir else Path(tempfile.mkdtemp(prefix="equiray-ensemble-eval-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ensemble_selection.md").write_text(table + "\n")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(out_dir / "ensemble_selection.md"), "eval")
        for r in selection:
            for k in ("accuracy", "orbit_accuracy", "osp", "kl"):
                mlflow.log_metric(f"select/{slug(r['setting'])}/{slug(r['members'].split()[0])}/{k}", r[k])
    return EnsembleSelectResult(run_id=run_id, tracking_uri=uri, selection=tuple(selection), table=table,
                                verdict=tuple(selection_verdict(selection)))
