"""Knowledge distillation (Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015) of a
teacher (an augmentation ensemble) into one student, and how the two are compared.

The student is trained by :func:`equiray.train.train_epoch` with :class:`Distillation` as the objective and the
group as ``augment``: it matches the teacher's softened outputs on *group-transformed* inputs, so it learns the
teacher's behaviour on the whole orbit (Nordenfors & Flinth's ensemble mean is invariant; a student carries no
such guarantee, so it is measured with the same OSP / symmetric KL, :func:`measure`, and its serving cost,
:func:`ms_per_image`, next to the teacher).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.groups import Group
from equiray.metrics import invariance, orbit_logits
from equiray.train import Step

__all__ = ["Distillation", "distill_loss", "measure", "ms_per_image"]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                 temperature: float, hard_weight: float) -> torch.Tensor:
    """Hinton's soft-target loss ``T^2 KL(softmax(t/T) || softmax(s/T))`` (batch mean; the ``T^2`` keeps the
    gradient's scale independent of ``T``) plus ``hard_weight`` times the cross-entropy on the true labels."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t
    return soft + hard_weight * F.cross_entropy(student_logits, labels) if hard_weight else soft


@dataclass(frozen=True, eq=False)
class Distillation:
    """The objective of a student: :func:`distill_loss` against ``teacher``'s logits on the same (augmented)
    batch, computed without gradients. ``teacher`` stays in whatever mode it is in (eval, as loaded). ``turn``:
    a function of the batch applied first, the same turned images for both (e.g. random continuous rotations, so a
    student learns what a rotation-robust teacher does at any angle)."""

    teacher: nn.Module
    temperature: float = 2.0
    hard_weight: float = 0.0
    turn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"Distillation: the temperature must be > 0, got {self.temperature}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
        if self.turn is not None:
            x = self.turn(x)
        with torch.no_grad():
            target = self.teacher(x)
        logits = model(x)
        return Step(distill_loss(logits, target, y, temperature=self.temperature, hard_weight=self.hard_weight),
                    logits)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, group: Group, *,
            batch_size: int = 256) -> dict[str, float]:
    """OSP, symmetric KL, upright and orbit accuracy of ``model`` over ``group``'s orbit of ``(x, y)``
    (see :func:`equiray.metrics.invariance`)."""
    return invariance(orbit_logits(model, x, group, batch_size=batch_size), y)


@torch.no_grad()
def ms_per_image(model: nn.Module, x: torch.Tensor, *, repeats: int = 5) -> float:
    """Inference latency in milliseconds per image on the batch ``x``: the best of ``repeats`` timed calls after
    one warm-up call (the serving cost), in eval mode."""
    model.eval()
    model(x)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t)
    return 1000 * best / len(x)
