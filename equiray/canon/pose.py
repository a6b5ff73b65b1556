"""A continuous pose from a canonicalizer's group scores (Kaba et al. 2023's idea, on equiray's C_n / D_n nets).

A canonicalizer over ``C_n`` gives one score per rotation by ``2 pi k / n``; rotating the input by a group element
shifts the scores cyclically. The scores' first circular harmonic, the 2-vector

    v(x) = sum_k w_k(x) (cos 2 pi k / n, sin 2 pi k / n),    w = softmax(beta * scores)

transforms like the plane itself under those shifts: rotating the input by ``2 pi j / n`` rotates ``v`` by the
same angle, exactly. Its angle ``theta(x) = atan2(v_y, v_x)`` is a pose that is not confined to the grid: an input
rotated half-way between two elements scores both, and the weighted mean lands between them. The canonical input
is the input rotated back by ``theta`` (pad, rotate bilinearly, crop), so the backbone sees any input within the
canonicalizer's error of upright, instead of within ``180 / n`` degrees.

For ``D_n`` the reflection is chosen first (the half of the scores, mirrored or not, holding the best score) and
the angle is read from that half; the reflection choice carries no gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from equiray.groups import Group, cyclic, rotate

__all__ = ["Pose", "continuous_pose", "undo_pose"]


@dataclass(frozen=True)
class Pose:
    """``angle``: radians, counter-clockwise, in (-pi, pi] (B,); ``mirrored``: whether the input was read as a
    mirrored one (B,) bool; ``strength``: |v| in [0, 1], how decided the canonicalizer is (B,)."""

    angle: torch.Tensor
    mirrored: torch.Tensor
    strength: torch.Tensor

    def nearest_element(self, group: Group) -> torch.Tensor:
        """The group element closest to this pose (``s * n + k``: the mirror bit, then the nearest rotation)."""
        n = group.n
        k = torch.round(self.angle / (2 * math.pi / n)).long() % n
        return self.mirrored.long() * n + k if group.reflections else k

    def degrees(self) -> torch.Tensor:
        return torch.rad2deg(self.angle) % 360.0

    def snapped(self, tolerance_deg: float) -> "Pose":
        """The pose with every angle within ``tolerance_deg`` of a quarter turn set to that quarter turn.

        Quarter turns move pixels onto pixels: turning back by one leaves the image as sharp as it came, while
        any other angle resamples it. A pose that close to a quarter turn is more likely the canonicalizer's
        error around an exact one (an upright photo, a scan turned by 90 degrees) than a true small tilt.
        """
        if tolerance_deg <= 0:
            return self
        quarter = math.pi / 2
        nearest = torch.round(self.angle / quarter) * quarter + 0.0  # + 0.0: -0.0 (a small negative angle) reads 0
        near = (self.angle - nearest).abs() < math.radians(tolerance_deg)
        angle = torch.where(near, nearest, self.angle)
        angle = torch.where(angle <= -math.pi, angle + 2 * math.pi, angle)  # stay in (-pi, pi]
        return Pose(angle, self.mirrored, self.strength)


def continuous_pose(scores: torch.Tensor, group: Group, *, beta: float = 1.0) -> Pose:
    """The pose read off scores ``(B, |G|)`` (element order ``s * n + k``); differentiable in the scores."""
    n = group.n
    b = scores.shape[0]
    if group.reflections:
        halves = scores.view(b, 2, n)  # (B, 2, n): unmirrored, mirrored
        mirrored = halves.amax(-1).argmax(-1).bool()  # (B,)
        half = torch.where(mirrored[:, None], halves[:, 1], halves[:, 0])  # (B, n)
    else:
        mirrored = torch.zeros(b, dtype=torch.bool, device=scores.device)
        half = scores
    w = torch.softmax(beta * half, dim=-1)  # (B, n)
    phi = torch.arange(n, device=scores.device, dtype=w.dtype) * (2 * math.pi / n)
    vx, vy = (w * torch.cos(phi)).sum(-1), (w * torch.sin(phi)).sum(-1)
    return Pose(torch.atan2(vy, vx), mirrored, torch.sqrt(vx * vx + vy * vy))


def _rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.rot90(x, k, dims=(-2, -1))`` from flips and a transpose (operations ONNX has)."""
    if k == 1:
        return x.flip(-1).transpose(-2, -1)
    if k == 2:
        return x.flip(-1).flip(-2)
    return x.transpose(-2, -1).flip(-1)


def undo_pose(x: torch.Tensor, pose: Pose, *, padding: str = "zeros") -> torch.Tensor:
    """The canonical input ``c(x)^-1 . x``: rotate each image back by its angle, then undo its mirror (the group's
    element ``r^k m^s`` mirrors first and rotates second). Quarter turns move pixels exactly (no resampling)."""
    back = rotate(x, -pose.angle.to(x.dtype), padding=padding)
    turns = torch.round(pose.angle / (math.pi / 2))
    exact = (pose.angle - turns * (math.pi / 2)).abs() < 1e-6  # a quarter turn (a snapped pose): move pixels exactly
    if torch.jit.is_tracing():  # exported: every image's quarter turn in the graph, whatever the example's poses
        quarter = (-turns).long() % 4
        turned = x
        for q in (1, 2, 3):
            turned = torch.where((quarter == q)[:, None, None, None], _rot90(x, q), turned)
        back = torch.where(exact[:, None, None, None], turned, back)
    elif exact.any():
        back = torch.where(exact[:, None, None, None], cyclic(4).act(x, (-turns).long() % 4), back)
    return torch.where(pose.mirrored[:, None, None, None], back.flip(-1), back)
