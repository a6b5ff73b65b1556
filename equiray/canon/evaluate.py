"""Judging canonicalization variants: accuracy upright and over a group's rotated copies of a test set, the
identity rate, and the inference cost next to the bare backbone."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from equiray.canon.losses import identity_rate
from equiray.data.views import RANDOM_ROTATIONS, apply_view
from equiray.canon.model import CanonicalizedModel
from equiray.groups import Group, get_group
from equiray.train import accuracy, predict

__all__ = ["evaluate_variant", "Latencies", "paired_latencies"]


@torch.no_grad()
def evaluate_variant(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group: Group | str, *,
                     batch_size: int = 512, device: torch.device | str = "cpu",
                     angles: Sequence[float] = ()) -> dict[str, float]:
    """Upright accuracy, the Cn-avg accuracy (mean over the n rotated copies: pad, rotate, crop), the accuracy per
    rotation (``accuracy_rot_{e}``), the SO(2)-avg and O(2)-avg accuracies (each image at its own random angle,
    after a random mirror for O(2): the ``so2`` / ``o2`` views, seed 0), the accuracy at each of ``angles``
    (degrees: ``accuracy_angle_{deg}``, the accuracy-vs-angle curve) and the identity rate on upright inputs
    (canonicalized models)."""
    g = get_group(group)
    model.eval().to(device)
    per_element = []
    identity = []
    for e in g.elements():
        correct = 0
        for i in range(0, len(y), batch_size):
            xb = g.act(x[i:i + batch_size].to(device), e, padding="zeros")  # the rot:Cn:e views (BRIEF 3.3)
            if isinstance(model, CanonicalizedModel):
                logits, info = model.forward_with_info(xb)
                if e == g.identity:
                    identity.append(info.element.cpu())
            else:
                logits = model(xb)
            correct += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
        per_element.append(correct / len(y))
    out = {"upright_accuracy": per_element[0], "cn_avg_accuracy": sum(per_element) / len(per_element),
           **{f"accuracy_rot_{e}": a for e, a in enumerate(per_element)}}
    for view in (*RANDOM_ROTATIONS, *(f"angle:{d:g}" for d in angles)):
        key = f"{view}_accuracy" if view in RANDOM_ROTATIONS else f"accuracy_angle_{view.split(':')[1]}"
        out[key] = accuracy(predict(model, apply_view(x, view), batch_size=batch_size, device=device), y)
    if identity:
        out["identity_rate"] = identity_rate(torch.cat(identity), model.group)
    return out


@dataclass(frozen=True)
class Latencies:
    """``backbone_ms``: the bare backbone's ms per image; per timed model, in order: its ms per image and its
    overhead over the backbone (0.25: 25% slower)."""

    backbone_ms: float
    ms_per_image: tuple[float, ...]
    overhead: tuple[float, ...]


@torch.no_grad()
def paired_latencies(backbone: nn.Module, models: Sequence[nn.Module], batch: torch.Tensor, *,
                     rounds: int = 25) -> Latencies:
    """Time ``models`` and the bare ``backbone`` on the same ``batch``, in this one process.

    The models take turns round by round, the bare backbone first and last in every round; a model's overhead is
    the median over rounds of its time over the bare backbone's in that round, so a drift in machine load (Ray
    winding trials down, another process) hits both sides of every ratio alike."""
    backbone = backbone.eval()
    timed = [backbone, *models, backbone]
    times: list[list[float]] = [[] for _ in timed]
    for m in timed:
        m(batch)  # warm-up
    for _ in range(rounds):
        for i, m in enumerate(timed):
            start = time.perf_counter()
            m(batch)
            times[i].append(time.perf_counter() - start)
    bare_round = [(a + b) / 2 for a, b in zip(times[0], times[-1])]
    return Latencies(
        backbone_ms=1000 * statistics.median(bare_round) / len(batch),
        ms_per_image=tuple(1000 * statistics.median(t) / len(batch) for t in times[1:-1]),
        overhead=tuple(statistics.median(v / b for v, b in zip(t, bare_round)) - 1.0 for t in times[1:-1]))
