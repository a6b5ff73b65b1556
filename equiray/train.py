"""The one training loop and the evaluation steps every pipeline is built from (plain PyTorch).

Every single-model training in equiray (pretraining, canonicalization variants, FTP/TPGM/L2-SP trials,
distillation) runs :func:`train_epoch`; what differs between them is passed in, never copied:

- ``objective(model, x, y) -> Step``: the loss of one batch (cross-entropy by default; the canonicalization
  prior and contrastive terms, or a teacher's soft targets, are objectives of their own);
- ``augment``: a group whose uniformly random element is applied per sample (random group augmentation);
- ``regularizer(model) -> loss``: added to the objective for the backward pass only (L2-SP's penalty); the
  epoch's reported loss is the objective's;
- ``after_step(step)``: called after each optimizer step (TPGM's projection on a held-out batch);
- ``on_train(model)``: called after ``model.train()`` (keep a frozen backbone's BatchNorm in eval mode).

Where the loop runs (a Ray Train worker, a Tune trial, a plain process) is the pipelines' business; how it
steps is decided here. The vectorized trainers for many small networks at once (ensemble members, zoo nets)
live beside their models in :mod:`equiray.ensembles` and :mod:`equiray.nfn`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.data.views import apply_view
from equiray.groups import Group, Padding

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One batch's outcome: ``loss`` is minimised and reported, ``logits`` give the running accuracy against
    ``labels`` (the batch's own when None; set them when the logits read only part of the batch), ``metrics`` are
    further batch means reported as epoch means (e.g. ``{"prior": ..., "identity_rate": ...}``)."""

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    labels: torch.Tensor | None = None


Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], Step]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """The default objective: the task's cross-entropy."""
    logits = model(x)
    return Step(F.cross_entropy(logits, y), logits)


@dataclass(frozen=True)
class EpochStats:
    loss: float  # sample-weighted mean of the objective's loss (without the regularizer)
    accuracy: float  # training accuracy of the logits the objective returned (on the labels they answer)
    samples: int
    seconds: float
    metrics: Mapping[str, float] = field(default_factory=dict)  # sample-weighted means of Step.metrics


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                     generator: torch.Generator | None = None) -> Iterator[Batch]:
    """An epoch of in-memory batches in a fresh random order (the permutation is drawn when this is called)."""
    order = torch.randperm(len(y), generator=generator)
    return ((x[idx], y[idx]) for idx in order.split(batch_size))


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer, *,
                objective: Objective = cross_entropy, device: torch.device | str = "cpu",
                augment: Group | None = None, padding: Padding = "border",
                generator: torch.Generator | None = None,
                regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
                after_step: Callable[[int], None] | None = None,
                on_train: Callable[[nn.Module], None] | None = None) -> EpochStats:
    """One pass over ``batches`` of ``(images, labels)``: move to ``device``, augment (each sample its own
    uniformly random element of ``augment``, drawn from ``generator``), minimise ``objective`` (+
    ``regularizer``), step. See the module docstring for the hooks."""
    model.train()
    if on_train is not None:
        on_train(model)
    start = time.perf_counter()
    total_loss, correct, n, read = 0.0, 0, 0, 0
    sums: dict[str, float] = {}
    for step, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment.act(x, augment.sample(len(x), generator=generator, device=x.device), padding=padding)
        out = objective(model, x, y)
        loss = out.loss + regularizer(model) if regularizer is not None else out.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        total_loss += float(out.loss.detach()) * len(y)
        labels = y if out.labels is None else out.labels
        correct += int((out.logits.detach().argmax(-1) == labels).sum())
        read += len(labels)
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
        n += len(y)
    if n == 0:
        raise ValueError("train_epoch got no batches")
    return EpochStats(total_loss / n, correct / max(read, 1), n, time.perf_counter() - start,
                      {k: v / n for k, v in sums.items()})


@contextlib.contextmanager
def fast_layout(model: nn.Module, device: torch.device | str = "cpu") -> Iterator[nn.Module]:
    """Inside the block ``model`` keeps its 4-D weights channels-last when it runs on a CPU, where oneDNN's
    convolutions are faster that way (a resnet8 training step at batch 128 on 2 cores: 64 -> 48 ms; the inputs may
    stay as they are); on exit the default layout again (safetensors saves contiguous tensors only). Elsewhere
    nothing changes. Parameters are converted in place, so an optimizer made before or inside keeps them."""
    if torch.device(device).type != "cpu":
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


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
