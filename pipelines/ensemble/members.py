"""What an ``ensemble train`` run left, read back: its members (from MLflow) and the test images they are
measured on."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from equiray.ensembles import StackedEnsemble, load_group
from equiray.errors import EquirayError
from equiray.data import resize
from equiray_pipelines.ensemble.config import EnsembleConfig


def find_train_run(experiment: str, run_id: str | None = None) -> str:
    """``run_id``, or the latest finished ``ensemble train`` run in ``experiment``."""
    import mlflow

    if run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            run = mlflow.MlflowClient().get_run(run_id)
        except MlflowException:
            raise EquirayError(f"no run {run_id!r} in {mlflow.get_tracking_uri()}; leave the run id out to take the "
                               "latest finished `equiray ensemble train` run (without --run-id)") from None
        if run.data.tags.get("equiray.pipeline") != "ensemble-train":
            raise EquirayError(f"run {run_id} is not an `equiray ensemble train` run (it is "
                               f"{run.data.tags.get('equiray.pipeline', 'not equiray')}'s); pass one that is, or "
                               "leave --run-id out for the latest")
        return run_id
    exp = mlflow.get_experiment_by_name(experiment)
    runs = [] if exp is None else mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`equiray.pipeline` = 'ensemble-train' and attributes.status = "
        "'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        raise EquirayError(f"no finished `equiray ensemble train` run in experiment {experiment!r}; train one first "
                           "or pass --run-id")
    return runs[0].info.run_id


def load_members(run_id: str) -> tuple[dict[str, StackedEnsemble], list[dict]]:
    """The member groups logged by an ``ensemble train`` run, joined per setting (in member order), and every
    group's metadata."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="members", dst_path=tmp))
        parts = [load_group(f) for f in sorted(local.glob("group-*.safetensors"))]
    if not parts:
        raise EquirayError(f"run {run_id} has no member groups under members/")
    by_setting: dict[str, list] = {}
    for ens, meta in sorted(parts, key=lambda p: p[1]["gid"]):
        by_setting.setdefault(meta["setting"], []).append(ens)
    return {k: StackedEnsemble.concat(v) for k, v in by_setting.items()}, [m for _, m in parts]


def read_test(cfg: EnsembleConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The first ``eval.max_eval`` test images at the members' input size, their labels, and the data's metadata."""
    from equiray.data import read_split

    meta = cfg.data.prepare()
    x, y = read_split(str(Path(cfg.data.dir).resolve()), "test", limit=cfg.eval.max_eval)
    return resize(x, cfg.data.resize or meta["shape"][0]), y, meta
