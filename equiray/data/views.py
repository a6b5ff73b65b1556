"""Deterministic evaluation views of a split: the in-distribution and shifted test sets every report uses.

A view is named by a short spec string:

- ``upright``: the split as it is.
- ``rot:C8:3``: every image acted on by element 3 of C8 (135 degrees), zero padding (BRIEF 3.3's protocol:
  pad 0.4*H with zeros, rotate, centre-crop; sampling out of the image reads zeros, which is the same).
- ``reflect``: mirrored left-right.
- ``angle:D``: every image rotated counter-clockwise by ``D`` degrees (any real number). Multiples of 90 are
  exact quarter turns (``torch.rot90``); other angles pad with zeros, rotate bilinearly and centre-crop, the
  same convention as ``rot:`` views.
- ``so2``: each image rotated by its own angle, uniform in [0, 360), seeded by ``seed`` (the SO(2)-avg test set).
- ``o2``: each image mirrored left-right with probability 1/2, then rotated as in ``so2`` (the O(2)-avg test set).
- ``noise:S``, ``blur:S``, ``contrast:S``, ``brightness:S``, ``pixelate:S``, ``occlude:S``: a corruption at
  severity ``S`` in 1..5 (ImageNet-C style), random parts seeded by the view's name and ``seed`` so a view is
  the same on every run and every machine.

``group_views("C8")`` lists the rotated views whose mean accuracy is the ``C8-avg`` accuracy.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from equiray.errors import DataError
from equiray.groups import cyclic, get_group, rotate

__all__ = ["apply_view", "group_views", "corruption_views", "angle_views", "random_angles", "CORRUPTIONS",
           "RANDOM_ROTATIONS", "parse_view"]

RANDOM_ROTATIONS = ("so2", "o2")

_CHUNK = 4096


def _noise(x, s, gen):
    sigma = (0.04, 0.08, 0.12, 0.18, 0.26)[s - 1]
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp_(0, 1)


def _blur(x, s, gen):
    sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[s - 1]
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)  # horizontal pass
    return F.conv2d(xp, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)  # vertical pass


def _contrast(x, s, gen):
    f = (0.6, 0.45, 0.3, 0.2, 0.1)[s - 1]
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return ((x - mean) * f + mean).clamp_(0, 1)


def _brightness(x, s, gen):
    d = (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]
    return (x + d).clamp_(0, 1)


def _pixelate(x, s, gen):
    f = (0.8, 0.65, 0.5, 0.4, 0.3)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _occlude(x, s, gen):
    frac = (0.2, 0.3, 0.4, 0.5, 0.6)[s - 1]
    b, _, h, w = x.shape
    ph, pw = max(1, int(h * frac)), max(1, int(w * frac))
    top = torch.randint(0, h - ph + 1, (b,), generator=gen)
    left = torch.randint(0, w - pw + 1, (b,), generator=gen)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    mask = ((rows >= top[:, None, None]) & (rows < (top + ph)[:, None, None]) &
            (cols >= left[:, None, None]) & (cols < (left + pw)[:, None, None]))  # (B, H, W)
    return x.masked_fill(mask[:, None], 0.0)


CORRUPTIONS: dict[str, Callable] = {
    "noise": _noise, "blur": _blur, "contrast": _contrast, "brightness": _brightness,
    "pixelate": _pixelate, "occlude": _occlude,
}


def parse_view(spec: str) -> tuple[str, tuple]:
    """``"rot:C8:3"`` -> ``("rot", (Group C8, 3))``; raises a :class:`DataError` naming what is accepted."""
    parts = spec.split(":")
    kind = parts[0]
    try:
        if kind == "upright" and len(parts) == 1:
            return kind, ()
        if kind in ("reflect", *RANDOM_ROTATIONS) and len(parts) == 1:
            return kind, ()
        if kind == "angle" and len(parts) == 2:
            degrees = float(parts[1])
            if not math.isfinite(degrees):
                raise ValueError("the angle must be a finite number of degrees")
            return kind, (degrees,)
        if kind == "rot" and len(parts) == 3:
            group = get_group(parts[1])
            element = int(parts[2])
            if not 0 <= element < group.order:
                raise ValueError(f"element {element} not in {group.name}")
            return kind, (group, element)
        if kind in CORRUPTIONS and len(parts) == 2:
            severity = int(parts[1])
            if not 1 <= severity <= 5:
                raise ValueError("severity must be 1..5")
            return kind, (severity,)
    except ValueError as exc:
        raise DataError(f"bad view {spec!r}: {exc}") from None
    raise DataError(f"unknown view {spec!r}; use upright, reflect, so2, o2, angle:DEGREES (e.g. angle:30), "
                    "rot:GROUP:ELEMENT (e.g. rot:C8:3) or "
                    f"CORRUPTION:SEVERITY with CORRUPTION in {', '.join(CORRUPTIONS)} and SEVERITY 1..5")


def describe_view(spec: str) -> str:
    """A view as a person reads it on a plot: ``rot:C4:1`` -> ``turned 90 deg``, ``noise:3`` -> ``noise, severity 3``,
    ``so2`` -> ``random angle``."""
    kind, args = parse_view(spec)
    if kind == "rot":
        group, element = args
        turn = int(group.rotation(element)) * 360 / group.n
        said = ([f"turned {turn:g} deg"] if turn else []) + (["mirrored"] if int(group.reflection(element)) else [])
        return ", ".join(said) or "upright"
    if kind == "angle":
        return f"turned {args[0]:g} deg"
    if kind in CORRUPTIONS:
        return f"{kind}, severity {args[0]}"
    return {"upright": "upright", "reflect": "mirrored", "so2": "random angle",
            "o2": "random angle, mirrored half the time"}[kind]


def apply_view(x: torch.Tensor, spec: str, *, seed: int = 0) -> torch.Tensor:
    """The view ``spec`` of a whole split ``x`` (``(N, C, H, W)``, values in [0, 1]); deterministic."""
    kind, args = parse_view(spec)
    if kind == "upright":
        return x.clone()
    if kind == "reflect":
        return x.flip(-1)
    if kind == "rot":
        group, element = args
        return torch.cat([group.act(x[i:i + _CHUNK], element, padding="zeros") for i in range(0, len(x), _CHUNK)])
    if kind == "angle":
        return _rotate_by(x, torch.full((len(x),), args[0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.encode()))
    if kind in RANDOM_ROTATIONS:
        mirror, degrees = random_angles(len(x), mirror=kind == "o2", generator=gen)
        return _rotate_by(torch.where(mirror[:, None, None, None], x.flip(-1), x), degrees)
    fn = CORRUPTIONS[kind]
    return torch.cat([fn(x[i:i + _CHUNK].clone(), args[0], gen) for i in range(0, len(x), _CHUNK)])


def random_angles(n: int, *, mirror: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws of the ``so2`` / ``o2`` views: ``(mirrored (n,) bool, degrees (n,) float64 in [0, 360))``; the
    mirrors are drawn first (all False without ``mirror``), so an ``o2`` view's angles differ from ``so2``'s."""
    flips = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5 if mirror else torch.zeros(n, dtype=torch.bool)
    return flips, torch.rand(n, generator=generator, dtype=torch.float64) * 360.0


def _rotate_by(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` counter-clockwise by ``degrees[i]``: exact quarter turns where the angle is a multiple of
    90, else pad with zeros, rotate bilinearly, centre-crop (``equiray.groups.rotate``)."""
    out = x.clone()
    turns = torch.remainder(degrees, 360.0) / 90.0
    exact = turns == turns.round()
    c4 = cyclic(4)
    for i in range(0, len(x), _CHUNK):
        sl = slice(i, i + _CHUNK)
        ex = exact[sl]
        if ex.any():
            idx = torch.nonzero(ex).squeeze(1) + i
            out[idx] = c4.act(x[idx], turns[idx].round().long() % 4)
        if (~ex).any():
            idx = torch.nonzero(~ex).squeeze(1) + i
            out[idx] = rotate(x[idx], torch.deg2rad(degrees[idx]).to(x.dtype), padding="zeros")
    return out


def angle_views(step: float = 5.0) -> list[str]:
    """``angle:D`` views from 0 to 360 degrees (exclusive) in ``step``-degree steps: the accuracy-vs-angle curve."""
    if step <= 0:
        raise DataError(f"the angle step must be > 0 degrees, not {step}")
    return [f"angle:{d:g}" for d in (i * step for i in range(math.ceil(360.0 / step)))]


def group_views(group: str) -> list[str]:
    """One rotated view per element of ``group``, in the group's element order."""
    g = get_group(group)
    return [f"rot:{g.name}:{e}" for e in g.elements()]


def corruption_views(severity: int = 3, kinds: Iterable[str] = ("noise", "blur", "contrast")) -> list[str]:
    return [f"{k}:{severity}" for k in kinds]
