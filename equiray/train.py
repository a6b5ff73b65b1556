"""Training and evaluation steps shared by every pipeline (plain PyTorch; the Ray loops are built from these)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.data.views import apply_view
from equiray.groups import Group


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                optimizer: torch.optim.Optimizer, *, device: torch.device | str = "cpu",
                augment: Group | None = None, generator: torch.Generator | None = None) -> EpochStats:
    """One pass over ``batches`` of ``(images, labels)``; with ``augment``, each sample gets its own uniformly
    random element of that group (random group augmentation)."""
    model.train()
    start = time.perf_counter()
    total_loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment.act(x, augment.sample(len(x), generator=generator, device=x.device))
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("train_epoch got no batches")
    return EpochStats(total_loss / n, correct / n, n, time.perf_counter() - start)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, device: torch.device | str = "cpu"
            ) -> torch.Tensor:
    """Logits for a whole tensor of images, in batches, in eval mode."""
    model.eval()
    outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def evaluate_views(model: nn.Module, x: torch.Tensor, y: torch.Tensor, views: Iterable[str], *,
                   batch_size: int = 1024, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Accuracy of ``model`` on each named view of the split ``(x, y)`` (see :mod:`equiray.data.views`)."""
    return {v: accuracy(predict(model, apply_view(x, v, seed=seed), batch_size=batch_size, device=device), y)
            for v in views}
