"""Training one canonicalization variant: a canonicalizer (or none, for the baselines) around a pretrained backbone,
fine-tuned or frozen, with the canonicalization prior and the contrastive term as an objective of
:func:`equiray.train.train_epoch`.

Where a variant trains (a Ray Tune trial, a benchmark script) is the caller's business; what a training step is
and the order of its random draws are fixed here, so the same seed gives the same weights everywhere.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.canon.canonicalizers import create_canonicalizer, list_canonicalizers
from equiray.canon.losses import contrastive_loss, prior_loss
from equiray.canon.model import CanonicalizedModel
from equiray.errors import EquirayError
from equiray.groups import get_group
from equiray.train import Step, cross_entropy, fast_layout, shuffled_batches, train_epoch

__all__ = ["BACKBONE_MODES", "LR_SCHEDULES", "lr_scheduler", "POSES", "TRAIN_ROTATIONS", "RandomRotations",
           "RotatedCrossEntropy", "Variant", "CanonObjective", "PoseObjective", "build_variant", "variant_optimizer",
           "train_variant"]

BackboneMode = Literal["finetune", "frozen"]
BACKBONE_MODES: tuple[BackboneMode, ...] = ("finetune", "frozen")
POSES = ("element", "angle")
TRAIN_ROTATIONS = ("none", "so2", "o2")


@dataclass(frozen=True)
class Variant:
    """One model of a canonicalization sweep.

    ``kind``: a registered canonicalizer, or ``"none"`` for the bare backbone (the baselines); ``group``: the
    canonicalizer's group (and the augmentation's, with ``augment``: each training image turned by a random
    element); ``prior_weight``: the weight of the canonicalization prior; ``backbone``: fine-tuned or frozen;
    ``pose``: turn inputs back by the chosen group element, or by a continuous angle read off the scores;
    ``rotations``: ``none`` trains on the upright images; ``so2`` turns each training image by its own uniform
    random angle (``o2``: after a random mirror too), and the prior then targets that pose instead of the
    identity (the data are upright, so the applied turn is the pose to undo).
    """

    name: str
    kind: str
    group: str
    augment: bool = False
    prior_weight: float = 0.0
    backbone: BackboneMode = "finetune"
    pose: Literal["element", "angle"] = "element"
    rotations: Literal["none", "so2", "o2"] = "none"

    def __post_init__(self):
        if self.kind != "none" and self.kind not in list_canonicalizers():
            raise EquirayError(f"variant {self.name!r}: unknown canonicalizer {self.kind!r}; choose one of "
                               f"{', '.join(list_canonicalizers())} or none")
        if self.backbone not in BACKBONE_MODES:
            raise EquirayError(f"variant {self.name!r}: backbone {self.backbone!r} is not one of {BACKBONE_MODES}")
        if self.pose not in POSES:
            raise EquirayError(f"variant {self.name!r}: pose {self.pose!r} is not one of {POSES}")
        if self.rotations not in TRAIN_ROTATIONS:
            raise EquirayError(f"variant {self.name!r}: rotations {self.rotations!r} is not one of {TRAIN_ROTATIONS}")
        if self.rotations != "none" and self.augment:
            raise EquirayError(f"variant {self.name!r}: choose group augmentation or random rotations, not both")

    @property
    def canonicalized(self) -> bool:
        return self.kind != "none"

    @property
    def frozen(self) -> bool:
        return self.backbone == "frozen"


@dataclass(frozen=True)
class RandomRotations:
    """Turns every training image by its own uniform random angle in [0, 2 pi) (pad with zeros, rotate
    bilinearly, crop), after a random left-right mirror with probability 1/2 when ``mirror``: the element
    ``r^angle m^mirrored`` acting on upright data. ``upright_share``: the share of images left exactly as they
    are (pose: the identity), so upright inputs, the ones a user sends most, are a mode the canonicalizer and
    the backbone both learn (Mondal et al.'s prior, on turned data). Draws come from ``generator``: mirrors,
    angles, then (only with ``upright_share``) which images stay upright."""

    generator: torch.Generator
    mirror: bool = False
    upright_share: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.upright_share < 1.0:
            raise EquirayError(f"upright_share is a share of the images in [0, 1), not {self.upright_share}")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(turned images, angles (B,) radians, mirrored (B,) bool), on ``x``'s device."""
        from equiray.data.views import random_angles
        from equiray.groups import rotate

        mirrored, degrees = random_angles(len(x), mirror=self.mirror, generator=self.generator)
        if self.upright_share:
            keep = torch.rand(len(x), generator=self.generator) < self.upright_share
            mirrored, degrees = mirrored & ~keep, torch.where(keep, torch.zeros_like(degrees), degrees)
        mirrored, angle = mirrored.to(x.device), torch.deg2rad(degrees).to(x.device, x.dtype)
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
        return rotate(x, angle, padding="zeros"), angle, mirrored


@dataclass(frozen=True)
class RotatedCrossEntropy:
    """The task's cross-entropy on randomly turned inputs (the rotation-augmentation baseline)."""

    rotations: RandomRotations

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
        return cross_entropy(model, self.rotations(x)[0], y)


@dataclass(frozen=True)
class CanonObjective:
    """A canonicalized model's loss for :func:`~equiray.train.train_epoch`: the task's cross-entropy, plus
    ``prior_weight`` x the canonicalization prior (the training images are upright; ``prior_beta`` scales the
    scores inside it), plus ``contrastive_weight`` x the contrastive term (optimized canonicalizer only).

    Every batch reports the prior, the contrastive term and the identity rate, whatever their weights.

    With ``rotations`` every input is first turned by a random pose, and the prior targets that pose
    (:func:`pose_prior`; the identity rate then reads: share of inputs mapped to the element nearest their pose).
    """

    prior_weight: float = 0.0
    prior_beta: float = 1.0
    contrastive_weight: float = 1.0
    rotations: RandomRotations | None = None

    def __call__(self, model: CanonicalizedModel, x: torch.Tensor, y: torch.Tensor) -> Step:
        if self.rotations is None:
            logits, info = model.forward_with_info(x)
            prior = prior_loss(info.scores, model.group, beta=self.prior_beta)
            target = torch.full_like(info.element, model.group.identity)
        else:
            x, angle, mirrored = self.rotations(x)
            logits, info = model.forward_with_info(x)
            prior, target = pose_prior(info, model.group, angle, mirrored, beta=self.prior_beta)
        loss = F.cross_entropy(logits, y)
        if self.prior_weight and info.scores.requires_grad:  # a frozen canonicalizer: the prior is only reported
            loss = loss + self.prior_weight * prior
        contrast = contrastive_loss(info.embeddings) if info.embeddings is not None else torch.zeros(())
        if info.embeddings is not None and self.contrastive_weight:
            loss = loss + self.contrastive_weight * contrast
        identity = (info.element == target).double().mean()
        return Step(loss, logits, {"prior": prior, "contrastive": contrast, "identity_rate": identity})


def pose_prior(info, group, angle: torch.Tensor, mirrored: torch.Tensor, *, beta: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior on turned inputs, and the element nearest the applied pose per input.

    For a pose on the grid (``info.angle`` None): the cross-entropy of ``beta`` x the scores against that element.
    For a continuous pose: the cross-entropy against the applied angle shared between its two neighbouring
    rotations, in proportion to its nearness (an input turned a quarter of the way from element k to k+1: 3/4 on
    k, 1/4 on k+1; the mirror half as applied), plus ``1 - cos`` of the angle error. A one-hot target there would
    train the scores to pick one element, so that the angle read off them stays on the grid (a 45-degree grid:
    errors up to 22.5 degrees, median 11).
    """
    step = 2 * math.pi / group.n
    k = torch.round(angle / step).long() % group.n
    target = mirrored.long() * group.n + k if group.reflections else k
    if info.angle is None:
        return F.cross_entropy(beta * info.scores, target), target
    position = torch.remainder(angle / step, group.n)  # in [0, n): between element floor and floor + 1
    low = position.floor().long() % group.n
    frac = position - position.floor()
    offset = mirrored.long() * group.n if group.reflections else 0
    neighbours = torch.stack([offset + low, offset + (low + 1) % group.n], 1)  # (B, 2)
    shares = torch.stack([1 - frac, frac], 1).to(info.scores.dtype)
    soft = torch.zeros_like(info.scores).scatter_add_(1, neighbours, shares)
    prior = F.cross_entropy(beta * info.scores, soft) + (1 - torch.cos(info.angle - angle)).mean()
    return prior, target


@dataclass(frozen=True)
class PoseObjective:
    """Pose training before the task: the canonicalizer alone learns to undo the random pose of each turned input
    (the prior of :func:`pose_prior`, plus the contrastive term for the optimized canonicalizer); the backbone
    reads the canonical inputs without gradients, for the reported accuracy only. Run with an optimizer over the
    canonicalizer's parameters: the canonicalizer learns what upright is before the backbone learns to read it.
    ``accuracy_sample``: the backbone reads only the first N canonical inputs of each batch (0: all), for that
    accuracy (a backbone pass was a quarter of a pose step at batch 128 with N = all)."""

    rotations: RandomRotations
    prior_beta: float = 1.0
    contrastive_weight: float = 1.0
    accuracy_sample: int = 32

    def __call__(self, model: CanonicalizedModel, x: torch.Tensor, y: torch.Tensor) -> Step:
        x, angle, mirrored = self.rotations(x)
        info = model.canonicalize(x)
        prior, target = pose_prior(info, model.group, angle, mirrored, beta=self.prior_beta)
        contrast = contrastive_loss(info.embeddings) if info.embeddings is not None else torch.zeros(())
        loss = prior + self.contrastive_weight * contrast if info.embeddings is not None else prior
        read = slice(0, self.accuracy_sample or None)
        with torch.no_grad():
            logits = model.backbone(info.inputs[read].detach())
        identity = (info.element == target).double().mean()
        return Step(loss, logits, {"prior": prior, "contrastive": contrast, "identity_rate": identity}, y[read])


def build_variant(variant: Variant, backbone_spec: Mapping[str, Any],
                  backbone_state: Mapping[str, torch.Tensor] | None = None, *,
                  canonicalizer_kwargs: Mapping[str, Any] | None = None, beta: float = 1.0,
                  pose_snap: float = 0.0, upright_backbone: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    """The variant's model and the spec that rebuilds it with ``create_model(spec["name"], **spec["kwargs"])``.

    ``backbone_spec`` is the pretrained backbone's model spec (``name``, ``in_chans``, ``num_classes``, ``kwargs``
    and what describes its data), ``backbone_state`` its weights; the canonicalizer (``canonicalizer_kwargs``:
    the options of ``variant.kind``) is initialised from ``seed``. ``beta``: the straight-through temperature;
    ``pose_snap``: a continuous pose's snap to quarter turns at inference, in degrees; ``upright_backbone``: keep a
    copy of the backbone as it came for the inputs the canonicalizer leaves untouched (both :class:`CanonicalizedModel`).
    """
    from equiray.models import create_model

    torch.manual_seed(seed)
    backbone = create_model(backbone_spec["name"], in_chans=backbone_spec["in_chans"],
                            num_classes=backbone_spec["num_classes"], **backbone_spec.get("kwargs", {}))
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    base = {k: backbone_spec[k] for k in ("in_chans", "num_classes", "classes", "input_shape", "data")
            if k in backbone_spec}
    if not variant.canonicalized:
        return backbone, {**base, "name": backbone_spec["name"], "kwargs": dict(backbone_spec.get("kwargs", {}))}
    kwargs = dict(canonicalizer_kwargs or {})
    canon = create_canonicalizer(variant.kind, variant.group, in_chans=backbone_spec["in_chans"], **kwargs)
    pose_snap = pose_snap if variant.pose == "angle" else 0.0
    upright = copy.deepcopy(backbone) if upright_backbone else None
    model = CanonicalizedModel(backbone, canon, beta=beta, pose=variant.pose, pose_snap=pose_snap, upright=upright)
    spec = {**base, "name": "canonicalized", "kwargs": {
        "backbone": backbone_spec["name"], "backbone_kwargs": dict(backbone_spec.get("kwargs", {})),
        "canonicalizer": variant.kind, "canonicalizer_kwargs": kwargs, "group": variant.group, "beta": beta}}
    if variant.pose != "element":  # older specs name no pose: the element
        spec["kwargs"]["pose"] = variant.pose
    if pose_snap:
        spec["kwargs"]["pose_snap"] = pose_snap
    if upright_backbone:
        spec["kwargs"]["upright_backbone"] = True
    return model, spec


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, CanonicalizedModel) else model


def variant_optimizer(model: nn.Module, variant: Variant, *, lr: float, canon_lr: float,
                      weight_decay: float, freeze_canonicalizer: bool = False) -> torch.optim.AdamW:
    """Freeze the backbone of a frozen variant; AdamW with the backbone at ``lr`` (fine-tuned variants and the
    baselines) and the canonicalizer at ``canon_lr``, each its own parameter group; ``freeze_canonicalizer`` freezes the
    canonicalizer instead (its pose as trained so far)."""
    backbone = _backbone(model)
    for p in backbone.parameters():
        p.requires_grad_(not variant.frozen)
    groups = []
    if not variant.frozen:
        groups.append({"params": list(backbone.parameters()), "lr": lr})
    if isinstance(model, CanonicalizedModel):
        model.canonicalizer.requires_grad_(not freeze_canonicalizer)
        if not freeze_canonicalizer:
            groups.append({"params": list(model.canonicalizer.parameters()), "lr": canon_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def train_variant(model: nn.Module, variant: Variant, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                  batch_size: int, lr: float, canon_lr: float, weight_decay: float, prior_beta: float = 1.0,
                  contrastive_weight: float = 1.0, seed: int = 0, device: torch.device | str = "cpu",
                  pose_epochs: int = 0, upright_share: float = 0.0, freeze_pose: bool = False,
                  lr_schedule: str = "constant", on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Train one variant on the upright images ``(x, y)`` (:class:`CanonObjective` for canonicalized models, the
    task's cross-entropy for the baselines); returns one row of metrics per epoch (also passed to ``on_epoch``).

    Variants trained on turned inputs (``variant.rotations``) leave ``upright_share`` of them upright; a
    canonicalized one first trains its canonicalizer alone for ``pose_epochs`` (:class:`PoseObjective`, the
    backbone frozen; those rows carry ``pose_phase: 1``), then the variant as usual for ``epochs`` (with
    ``freeze_pose`` the backbone alone, on inputs the canonicalizer, as the pose epochs left it, turned back).
    ``lr_schedule`` (those ``epochs``; the pose epochs keep ``canon_lr``): ``constant``, or ``one_cycle`` (each
    parameter group warms up to its rate over the first 15% of the steps, then anneals to ~0 on a cosine).

    Random numbers, in this order: ``torch.manual_seed(seed)`` (dropout), then from a generator seeded with
    ``seed`` every epoch's batch order and, with ``variant.augment``, every batch's group elements.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    with fast_layout(model, device):  # channels-last weights on a CPU while it trains
        canon = isinstance(model, CanonicalizedModel)
        rotations = None
        if variant.rotations != "none":  # its own generator: the batch order stays the upright variants'
            rotations = RandomRotations(torch.Generator().manual_seed(seed * 7919 + 1),
                                        mirror=variant.rotations == "o2", upright_share=upright_share)
        history = []
        if canon and rotations is not None and pose_epochs:
            history = _train_pose(model, rotations, x, y, epochs=pose_epochs, batch_size=batch_size,
                                  canon_lr=canon_lr, weight_decay=weight_decay, prior_beta=prior_beta,
                                  contrastive_weight=contrastive_weight, generator=gen, device=device,
                                  on_epoch=on_epoch)
        freeze_canon = canon and freeze_pose and bool(history)
        opt = variant_optimizer(model, variant, lr=lr, canon_lr=canon_lr, weight_decay=weight_decay,
                                freeze_canonicalizer=freeze_canon)
        if canon:
            objective = CanonObjective(variant.prior_weight, prior_beta, contrastive_weight, rotations)
        else:
            objective = RotatedCrossEntropy(rotations) if rotations is not None else cross_entropy
        backbone = _backbone(model)

        frozen = ([backbone] if variant.frozen else []) + ([model.canonicalizer] if freeze_canon else [])

        def keep_frozen_statistics(_model: nn.Module) -> None:
            for part in frozen:
                part.eval()  # their BatchNorm statistics as they were

        augment = get_group(variant.group) if variant.augment else None
        step = lr_scheduler(opt, lr_schedule, steps=epochs * math.ceil(len(y) / batch_size))
        for epoch in range(len(history), len(history) + epochs):
            stats = train_epoch(model, shuffled_batches(x, y, batch_size, generator=gen), opt, objective=objective,
                                device=device, augment=augment, padding="zeros", generator=gen, after_step=step,
                                on_train=keep_frozen_statistics if frozen else None)
            row = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "epoch_seconds": stats.seconds}
            if canon:
                row.update(train_prior_loss=stats.metrics["prior"], train_identity_rate=stats.metrics["identity_rate"],
                           train_contrastive=stats.metrics["contrastive"])
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
        if freeze_canon:
            model.canonicalizer.requires_grad_(True)
    model.eval()
    return history


LR_SCHEDULES = ("constant", "one_cycle")


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, *, steps: int) -> Callable[[int], None] | None:
    """A :func:`~equiray.train.train_epoch` ``after_step`` hook that moves ``opt``'s rates along ``schedule`` over
    ``steps`` optimizer steps (None for ``constant``): ``one_cycle`` warms each group up to its own ``lr`` over
    the first 15% of the steps, then anneals it to ~0 on a cosine."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule is one of {LR_SCHEDULES}, not {schedule!r}")
    if schedule == "constant" or steps < 1:
        return None
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                                pct_start=0.15)

    def after_step(_step: int) -> None:
        if sched.last_epoch + 1 < steps:  # the last step leaves the rate at its floor
            sched.step()

    return after_step


def _train_pose(model: CanonicalizedModel, rotations: RandomRotations, x: torch.Tensor, y: torch.Tensor, *,
                epochs: int, batch_size: int, canon_lr: float, weight_decay: float, prior_beta: float,
                contrastive_weight: float, generator: torch.Generator, device, on_epoch) -> list[dict]:
    """The canonicalizer alone on :class:`PoseObjective` (AdamW at ``canon_lr``), the backbone frozen in eval
    mode; one row per epoch, as :func:`train_variant`'s, with ``pose_phase: 1``."""
    opt = torch.optim.AdamW(model.canonicalizer.parameters(), lr=canon_lr, weight_decay=weight_decay)
    objective = PoseObjective(rotations, prior_beta, contrastive_weight)
    frozen = [p for p in model.backbone.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history = []
    try:
        for epoch in range(epochs):
            stats = train_epoch(model, shuffled_batches(x, y, batch_size, generator=generator), opt,
                                objective=objective, device=device, padding="zeros", generator=generator,
                                on_train=lambda m: m.backbone.eval())
            row = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                   "epoch_seconds": stats.seconds, "pose_phase": 1.0, "train_prior_loss": stats.metrics["prior"],
                   "train_identity_rate": stats.metrics["identity_rate"],
                   "train_contrastive": stats.metrics["contrastive"]}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history
