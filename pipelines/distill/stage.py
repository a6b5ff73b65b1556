"""The distillation stage: train the student on Ray Train, measure it next to its teacher, register it (or, with
``reuse``, report the student this same config and teacher version registered before)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch

from equiray.config import to_dict
from equiray.data import read_split, split_files
from equiray.distill import measure, ms_per_image
from equiray.groups import get_group
from equiray_pipelines import tracking
from equiray.data import resize
from equiray_pipelines._common import fit
from equiray_pipelines.distill.config import DistillConfig
from equiray_pipelines.distill.report import STUDENT, TEACHER, distill_table, rows_from_metrics, rows_metrics, speedup
from equiray_pipelines.distill.worker import WorkerArgs, build_student, train_loop_per_worker
from equiray_pipelines.stage import Outcome, Stage, StageResult, StageRun


@dataclass(frozen=True, kw_only=True)
class DistillResult(StageResult):
    rows: Mapping[str, Mapping[str, float]]  # "ensemble (teacher)" and "student": accuracy, orbit_accuracy, osp,
    #                                          kl, orbit_size, ms_per_image
    speedup: float  # teacher's ms per image / student's
    train_seconds: float | None  # None for a reused run that did not log it


class Distill(Stage[DistillConfig, DistillResult]):
    pipeline = "distill"

    @cached_property
    def teacher(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The registered teacher and its spec (loading it fails early and clearly when nothing is registered)."""
        return tracking.load_model(self.cfg.teacher)

    @property
    def group(self) -> str:
        return self.cfg.group or self.teacher[1].get("group") or "C4"

    def check(self) -> None:
        self.cfg.data.check()
        get_group(self.group)  # loads the teacher (to read its group): both fail here, before anything starts

    def fingerprint(self) -> Any:
        return {"config": to_dict(self.cfg), "teacher": tracking.registry_version(self.cfg.teacher)}

    def default_run_name(self) -> str:
        return f"distill-{self.cfg.student.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def tags(self) -> dict[str, str]:
        return {"equiray.teacher": self.cfg.teacher}

    def execute(self, run: StageRun) -> Outcome[DistillResult]:
        import mlflow
        import ray.data

        cfg, (teacher, spec) = self.cfg, self.teacher
        data_dir = str(Path(cfg.data.dir).resolve())
        train_ds = ray.data.read_parquet(split_files(data_dir, "train"))
        if cfg.data.max_train:
            train_ds = train_ds.limit(cfg.data.max_train)
        args = WorkerArgs(group=self.group, run_id=run.run_id, tracking_uri=run.tracking_uri)
        result = fit(train_loop_per_worker, {"cfg": cfg, "args": args}, scaling=cfg.scaling, run_name=run.run_name,
                     storage_path=cfg.storage_path, datasets={"train": train_ds}, data_dir=data_dir)
        student = build_student(cfg.student, spec)
        with result.checkpoint.as_directory() as d:
            student.load_state_dict(torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)["model"])
        train_seconds = run.elapsed()

        x, y = read_split(data_dir, "test", limit=cfg.max_eval)
        x = resize(x, spec["input_shape"][-1])
        group = get_group(self.group)
        rows = {TEACHER: measure(teacher, x, y, group), STUDENT: measure(student.eval(), x, y, group)}
        if cfg.rotations != "none":  # trained at any angle: measured there too (the so2 / o2 view, seed 0)
            from equiray.data import apply_view
            from equiray.train import accuracy, predict

            turned = apply_view(x, cfg.rotations)
            for who, model in ((TEACHER, teacher), (STUDENT, student.eval())):
                rows[who][f"{cfg.rotations}_accuracy"] = accuracy(predict(model, turned, batch_size=256), y)
        batch = x[:256]
        rows[TEACHER]["ms_per_image"] = ms_per_image(teacher, batch)
        rows[STUDENT]["ms_per_image"] = ms_per_image(student, batch)
        mlflow.log_metrics(rows_metrics(rows))
        mlflow.log_metric("train_seconds", train_seconds)
        table = distill_table(rows, self.group)
        mlflow.log_text(table, "distill_table.md")
        if run.report_dir:
            run.report_dir.mkdir(parents=True, exist_ok=True)
            (run.report_dir / "distill_table.md").write_text(table + "\n")
        student_spec = {"name": cfg.student.name, "in_chans": spec["in_chans"], "num_classes": spec["num_classes"],
                        "kwargs": dict(cfg.student.kwargs), "input_shape": spec["input_shape"],
                        "classes": spec.get("classes"), "group": self.group, "teacher": cfg.teacher}
        model_uri = tracking.log_model(student, student_spec, name="student")
        out = DistillResult(pipeline=self.pipeline, run_id=run.run_id, run_name=run.run_name,
                            tracking_uri=run.tracking_uri, table=table, rows=rows, speedup=speedup(rows),
                            train_seconds=train_seconds)
        return Outcome(out, model_uri, tags={"run_id": run.run_id,
                                             "test_accuracy": f"{rows[STUDENT]['accuracy']:.4f}"})

    def from_registry(self, mv, run: StageRun) -> DistillResult:
        from mlflow import MlflowClient

        run_ = MlflowClient().get_run(mv.run_id)
        rows = rows_from_metrics(run_.data.metrics)
        return DistillResult(pipeline=self.pipeline, run_id=mv.run_id, run_name=run_.info.run_name,
                             tracking_uri=run.tracking_uri, table=distill_table(rows, self.group), rows=rows,
                             speedup=speedup(rows), train_seconds=run_.data.metrics.get("train_seconds"))


def run(cfg: DistillConfig, *, report_dir: str | os.PathLike | None = None, reuse: bool = False) -> DistillResult:
    """Distil, measure, register. With ``reuse``, a student registered by this very config (and teacher
    version) is reported instead of trained again."""
    return Distill(cfg, report_dir=report_dir, reuse=reuse).run()
