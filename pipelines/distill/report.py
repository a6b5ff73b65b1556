"""The distillation stage's table: the teacher and the student side by side."""
from __future__ import annotations

from typing import Mapping

TEACHER, STUDENT = "ensemble (teacher)", "student"
METRIC_PREFIX = {TEACHER: "teacher", STUDENT: "student"}  # the MLflow metrics of each row: teacher/osp, ...


def distill_table(rows: Mapping[str, Mapping[str, float]], group: str) -> str:
    lines = [f"| model | accuracy | {group}-orbit accuracy | OSP (max {next(iter(rows.values()))['orbit_size']}) "
             "| sym. KL (g != e) | ms / image |", "|---|---|---|---|---|---|"]
    turned = [k for k in ("so2_accuracy", "o2_accuracy") if k in next(iter(rows.values()))]
    if turned:  # a student of a rotation-robust teacher: its accuracy at a random angle (and mirror), and the share
        lines[0] += "".join(f" {'SO(2)' if k == 'so2_accuracy' else 'O(2)'}-avg accuracy |" for k in turned)
        lines[0] += " of the teacher's |"
        lines[1] += "---|" * (len(turned) + 1)
    for who, m in rows.items():
        line = (f"| {who} | {m['accuracy'] * 100:.1f}% | {m['orbit_accuracy'] * 100:.1f}% | {m['osp']:.3f} | "
                f"{m['kl']:.4f} | {m['ms_per_image']:.3f} |")
        if turned:
            line += "".join(f" {m[k] * 100:.1f}% |" for k in turned)
            share = m[turned[0]] / rows[TEACHER][turned[0]]
            line += f" {share * 100:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def rows_metrics(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The rows as flat MLflow metrics, ``teacher/osp``, ``student/ms_per_image``, ..."""
    return {f"{METRIC_PREFIX[who]}/{k}": float(v) for who, m in rows.items() for k, v in m.items()}


def rows_from_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The rows back from a run's metrics (what :func:`rows_metrics` logged)."""
    return {who: {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(key + "/")}
            for who, key in METRIC_PREFIX.items()}


def speedup(rows: Mapping[str, Mapping[str, float]]) -> float:
    """How many times cheaper the student's inference is than the teacher's."""
    return rows[TEACHER]["ms_per_image"] / rows[STUDENT]["ms_per_image"]
