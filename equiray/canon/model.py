"""The canonicalized model ``Phi(x) = c(x) . phi(c(x)^-1 . x)`` (Mondal et al. 2023): a backbone ``phi`` (any model,
frozen or fine-tuned) reads the canonical input, and its output is mapped back by the chosen element ``c(x)``.

Training uses the straight-through argmax ``onehot(argmax a) + softmax(beta a) - softmax(beta a).detach()``. The
papers turn the one-hot into an angle and rotate by it; here the one-hot weights the ``|G|`` transformed copies
``h^-1.x`` directly, which is the same forward value (exact on the pixel grid for C4/D4 instead of an
interpolated rotation). Its gradient is not equiadapt's: equiadapt differentiates through the rotation by the
one-hot-weighted angle, here the softmax weights the |G| rotated copies; either passes the scores a gradient.

``pose="angle"`` reads a continuous pose off the scores instead (:mod:`equiray.canon.pose`): the canonical input is
the input rotated back by any angle, not only by a group element, and the answer reports that angle.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from equiray.canon.canonicalizers import Canonicalizer, create_canonicalizer
from equiray.canon.losses import straight_through
from equiray.canon.pose import continuous_pose, undo_pose
from equiray.groups import Group, OutputKind
from equiray.models import create_model, register_model

__all__ = ["Canonicalization", "CanonicalizedModel", "canonicalized", "canonicalized_in"]


@dataclasses.dataclass(frozen=True)
class Canonicalization:
    """What a canonicalizer decided for a batch.

    ``inputs``: the canonical inputs ``c(x)^-1 . x`` (B, C, H, W); ``element``: the chosen element per input (B,);
    ``scores``: one score per group element (B, |G|); ``embeddings``: the optimized canonicalizer's unit-norm
    embeddings of every copy (B, |G|, D), for its contrastive loss (None for the equivariant one); ``angle``: with
    a continuous pose, the angle each input was turned back by, in radians counter-clockwise (B,), else None
    (``element``, the nearest group element, then says the same on the grid).
    """

    inputs: torch.Tensor
    element: torch.Tensor
    scores: torch.Tensor
    embeddings: torch.Tensor | None = None
    angle: torch.Tensor | None = None

    def degrees(self, group: Group) -> torch.Tensor:
        """The pose in degrees in [0, 360): the continuous angle, or the chosen element's rotation."""
        rad = self.angle if self.angle is not None else group.angles(self.element).to(self.scores.device)
        return torch.rad2deg(rad) % 360.0


class CanonicalizedModel(nn.Module):
    """A backbone behind a canonicalizer: invariant (``output="invariant"``, class logits) or equivariant
    (``"dense"`` maps, ``"regular"`` channels) by construction.

    ``forward`` returns the backbone's output mapped back by ``c(x)``; :meth:`canonicalize` and
    :meth:`forward_with_info` also return the chosen element per input. ``padding`` fills the corners that a
    rotation by other than 90 degrees brings in: ``zeros`` suits objects on a blank background (replicating the
    border smears any edge that touches it into streaks), ``border`` suits natural images. ``pose``: ``element``
    turns each input back by the chosen group element; ``angle`` by a continuous angle read off the scores
    (invariant outputs only). ``pose_snap``: with ``angle``, in eval mode, a pose within this many degrees of a
    quarter turn is taken as that quarter turn (:meth:`Pose.snapped`), so an upright input reaches the backbone
    unresampled; 0 turns every input back by its angle as read. Training always uses the angle as read.

    ``upright``: a second backbone, kept as it came (the pretrained one), that reads the inputs the canonicalizer
    leaves as they are (the identity element; with a continuous pose, an angle snapped to 0 and no mirror), in eval
    mode; ``backbone``, fine-tuned on turned inputs, reads the others, turned back. Canonicalize only what looks
    turned (OOD-gated canonicalization, 2026): an upright input is answered as the pretrained backbone would answer
    it, at its upright accuracy, unless the canonicalizer misreads its pose. It is never trained here.
    """

    def __init__(self, backbone: nn.Module, canonicalizer: Canonicalizer, *,
                 output: OutputKind | str = OutputKind.INVARIANT, beta: float = 1.0,
                 padding: Literal["border", "zeros"] = "zeros", pose: Literal["element", "angle"] = "element",
                 pose_snap: float = 0.0, upright: nn.Module | None = None):
        super().__init__()
        if pose not in ("element", "angle"):
            raise ValueError(f"pose is 'element' or 'angle', not {pose!r}")
        if not 0.0 <= pose_snap < 45.0:
            raise ValueError(f"pose_snap is a tolerance in degrees in [0, 45), not {pose_snap!r}")
        self.backbone, self.canonicalizer = backbone, canonicalizer
        self.output, self.beta, self.padding, self.pose = OutputKind(output), float(beta), padding, pose
        self.pose_snap = float(pose_snap)
        if pose == "angle" and self.output is not OutputKind.INVARIANT:
            raise ValueError("a continuous pose maps back only invariant outputs (class logits); use pose='element'")
        if upright is not None and self.output is not OutputKind.INVARIANT:
            raise ValueError("an upright backbone answers for invariant outputs (class logits) only")
        self.upright = upright
        if upright is not None:
            upright.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "CanonicalizedModel":
        super().train(mode)
        if self.upright is not None:
            self.upright.eval()  # kept as it came: its BatchNorm statistics too
        return self

    @property
    def group(self) -> Group:
        return self.canonicalizer.group

    def canonicalize(self, x: torch.Tensor) -> Canonicalization:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        g = self.group
        learning = x.requires_grad or any(p.requires_grad for p in self.canonicalizer.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and learning):  # a frozen one: no graph through it
            scores, emb = self.canonicalizer.score(self.canonicalizer.prepare(x))
        if self.pose == "angle":
            pose = continuous_pose(scores, g, beta=self.beta)
            if not self.training:
                pose = pose.snapped(self.pose_snap)
            return Canonicalization(undo_pose(x, pose, padding=self.padding), pose.nearest_element(g), scores, emb,
                                    angle=pose.angle)
        element = scores.argmax(-1)
        if torch.is_grad_enabled() and scores.requires_grad:
            # every copy h^-1.x, weighted by the straight-through one-hot: forward = the chosen copy
            weights = straight_through(scores, self.beta)  # (B, |G|)
            inv = g.inverse(torch.arange(g.order, device=x.device)).repeat(x.shape[0])
            copies = g.act(x.repeat_interleave(g.order, dim=0), inv, padding=self.padding)
            copies = copies.view(x.shape[0], g.order, *x.shape[1:])  # (B, |G|, C, H, W)
            canon = torch.einsum("bg,bgchw->bchw", weights, copies)
        else:
            canon = g.act(x, g.inverse(element), padding=self.padding)
        return Canonicalization(canon, element, scores, emb)

    def forward_with_info(self, x: torch.Tensor) -> tuple[torch.Tensor, Canonicalization]:
        info = self.canonicalize(x)
        if self.upright is not None and not self.training:
            return self._gated(x, info), info
        out = self.backbone(info.inputs)
        return self.group.act_output(out, info.element, self.output, padding=self.padding), info

    def untouched(self, info: Canonicalization) -> torch.Tensor:
        """(B,) bool: the inputs the canonicalizer leaves as they are (the identity; an angle of exactly 0)."""
        same = info.element == self.group.identity
        return same & (info.angle == 0) if info.angle is not None else same

    def _gated(self, x: torch.Tensor, info: Canonicalization) -> torch.Tensor:
        """Logits: ``upright`` on the untouched inputs, ``backbone`` on the others (each runs on its own rows)."""
        keep = self.untouched(info)
        if bool(keep.all()):
            return self.upright(x)
        if not bool(keep.any()):
            return self.backbone(info.inputs)
        turned = self.backbone(info.inputs[~keep])
        out = turned.new_empty((len(x), *turned.shape[1:]))
        out[~keep] = turned
        out[keep] = self.upright(x[keep]).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_info(x)[0]


def canonicalized_in(model: nn.Module) -> CanonicalizedModel | None:
    """The canonicalized model ``model`` is, or that it averages at test time (an ``OrbitAveraged`` around one:
    its ``forward_with_info`` then says the pose of the inputs as they came); else None."""
    from equiray.models import OrbitAveraged

    if isinstance(model, OrbitAveraged):
        model = model.backbone
    return model if isinstance(model, CanonicalizedModel) else None


@register_model
def canonicalized(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
                  backbone: str = "resnet8", backbone_kwargs: dict | None = None,
                  canonicalizer: str = "equivariant", canonicalizer_kwargs: dict | None = None,
                  group: str = "C8", beta: float = 1.0, output: str = "invariant",
                  padding: str = "zeros", pose: str = "element", pose_snap: float = 0.0,
                  upright_backbone: bool = False) -> nn.Module:
    """A backbone (equiray or timm name) behind a canonicalizer, as one model (weights: ``equiray canon sweep``);
    ``upright_backbone``: a second copy of the backbone answers for untouched inputs (:class:`CanonicalizedModel`)."""
    def make() -> nn.Module:
        return create_model(backbone, in_chans=in_chans, num_classes=num_classes, pretrained=pretrained,
                            **dict(backbone_kwargs or {}))

    canon = create_canonicalizer(canonicalizer, group, in_chans=in_chans, **dict(canonicalizer_kwargs or {}))
    return CanonicalizedModel(make(), canon, output=output, beta=beta, padding=padding, pose=pose, pose_snap=pose_snap,
                              upright=make() if upright_backbone else None)
