"""Finite rotation/reflection groups acting on image batches (BRIEF 3.1).

Every group is an object with a fixed element order that augmentation, canonicalization and evaluation all
share. Elements are integers ``0 .. order-1``; for the dihedral group ``D_n`` element ``s * n + k`` is
``r^k m^s``: first reflect (``m``: a horizontal flip, mirroring the width axis) when ``s = 1``, then rotate by
``k * 360/n`` degrees counter-clockwise as the image is displayed (row 0 on top). ``C_n`` is the subgroup
``s = 0``; ``trivial()`` is ``C_1``.

The action on images is a left action: ``act(act(x, h), g) == act(x, g * h)``, exactly for every element
whose angle is a multiple of 90 degrees (``torch.rot90``/``flip``), and up to interpolation error otherwise
(bilinear sampling at ``grid_sample``'s points, from a gather plan cached per image size; ``padding="border"``
repeats the edge pixels, the same as pad-with-edge, rotate, centre-crop; ``padding="zeros"`` is pad-with-zeros).

Outputs transform by one of three rules (:class:`OutputKind`): class logits are invariant, dense maps rotate
like images, and regular-representation channels (one per group element, as produced by a group convolution)
are permuted: ``(g . f)(h) = f(g^-1 h)``.
"""
from __future__ import annotations

import enum
import functools
import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from equiray.registry import Registry

__all__ = [
    "Group",
    "OutputKind",
    "cyclic",
    "dihedral",
    "trivial",
    "get_group",
    "list_groups",
    "register_group",
]

Padding = Literal["border", "zeros"]
Elements = int | Sequence[int] | torch.Tensor


class OutputKind(str, enum.Enum):
    """How a model's output transforms when its input is transformed."""

    INVARIANT = "invariant"  # class logits: unchanged
    DENSE = "dense"  # (B, C, H, W) maps: rotate/flip like the input
    REGULAR = "regular"  # (B, C, |G|, ...) group channels: permuted, spatial dims (if any) transformed too


class Group:
    """The dihedral group ``D_n`` (``reflections=True``) or the cyclic group ``C_n``.

    Use the cached constructors :func:`cyclic`, :func:`dihedral`, :func:`trivial` or :func:`get_group`
    rather than this class directly, so that equal groups are the same object.
    """

    def __init__(self, n: int, reflections: bool):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"a rotation group needs n >= 1 rotations, got {n!r}")
        self.n = n
        self.reflections = bool(reflections)
        self.order = n * (2 if reflections else 1)
        # Cayley table and inverses as tensors, so batched composition is one gather.
        idx = torch.arange(self.order)
        k, s = idx % n, idx // n
        # r^k1 m^s1 r^k2 m^s2 = r^(k1 + (-1)^s1 k2) m^(s1 xor s2)
        k_prod = (k[:, None] + torch.where(s[:, None] == 1, -k[None, :], k[None, :])) % n
        s_prod = (s[:, None] + s[None, :]) % 2
        self._table = s_prod * n + k_prod  # (|G|, |G|)
        # inverse: (r^k)^-1 = r^-k; (r^k m)^-1 = r^k m (a reflection is its own inverse)
        self._inverse = torch.where(s == 1, idx, ((-k) % n) + s * n)
        # per image size and device: the bilinear gather plans of every rotation (_plan) and the quarter-turn
        # pixel permutations (_quarter_turns)
        self._plans: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    # ---------------------------------------------------------------- identity and structure
    @property
    def name(self) -> str:
        return f"{'D' if self.reflections else 'C'}{self.n}"

    def __repr__(self) -> str:
        return f"Group({self.name}, order={self.order})"

    def __len__(self) -> int:
        return self.order

    def __reduce__(self):  # keep the one-instance-per-group cache across pickling (Ray ships groups)
        return (get_group, (self.name,))

    @property
    def identity(self) -> int:
        return 0

    def elements(self) -> list[int]:
        """All elements in the canonical order shared by every equiray component."""
        return list(range(self.order))

    def compose(self, g: Elements, h: Elements) -> torch.Tensor:
        """The product ``g * h`` (apply ``h`` first, then ``g``), elementwise over batches."""
        g_t, h_t = self._as_index(g), self._as_index(h)
        return self._table.to(g_t.device)[g_t, h_t]

    def inverse(self, g: Elements) -> torch.Tensor:
        g_t = self._as_index(g)
        return self._inverse.to(g_t.device)[g_t]

    def cayley_table(self) -> torch.Tensor:
        return self._table.clone()

    def rotation(self, g: Elements) -> torch.Tensor:
        """Number of rotation steps ``k`` of each element (multiply by ``360/n`` for degrees)."""
        return self._as_index(g) % self.n

    def reflection(self, g: Elements) -> torch.Tensor:
        """1 where the element reflects, else 0."""
        return self._as_index(g) // self.n

    def angles(self, g: Elements | None = None) -> torch.Tensor:
        """Rotation angle in radians of each element (all elements when ``g`` is None), float32."""
        g_t = torch.arange(self.order) if g is None else self._as_index(g)
        return (g_t % self.n).to(torch.float32) * (2 * math.pi / self.n)

    def is_exact(self, g: Elements | None = None) -> torch.Tensor:
        """True where the element acts on the pixel grid without interpolation (angle a multiple of 90)."""
        g_t = torch.arange(self.order) if g is None else self._as_index(g)
        return ((g_t % self.n) * 4) % self.n == 0

    def sample(self, size: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniformly random elements, one per sample (augmentation, Nordenfors & Flinth condition (d))."""
        return torch.randint(self.order, (size,), generator=generator).to(device)

    # ---------------------------------------------------------------- actions
    def act(self, x: torch.Tensor, g: Elements, *, padding: Padding = "border") -> torch.Tensor:
        """Transform an image batch ``x`` of shape ``(B, C, H, W)`` by ``g`` (one element, or one per image).

        Square images only for rotations that are not the identity or a half turn; elements whose angle is a
        multiple of 90 degrees are exact.
        """
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        g_t = self._per_sample(g, x.shape[0], x.device)
        out = x
        refl = (g_t >= self.n)
        if refl.any():
            out = torch.where(refl[:, None, None, None], out.flip(-1), out)
        k = g_t % self.n
        if bool((k == 0).all()):
            return out
        if x.shape[-1] != x.shape[-2] and bool((((k * 2) % self.n) != 0).any()):
            raise ValueError(f"rotating by other than 0/180 degrees needs square images, got {tuple(x.shape[-2:])}")
        # the input's memory layout is kept (clone): decoded images are channels-last, and a backbone's
        # convolutions pick their algorithm by the layout (1.7x apart for resnet8 at batch 256 here)
        result = out.clone()
        exact = self.is_exact(g_t)
        turned = exact & (k != 0)
        if bool(turned.any()):  # all quarter-turned images in one gather of a cached pixel permutation
            idx = turned.nonzero().squeeze(1)
            sub = out[idx]
            m, c, h, w = sub.shape
            perm = self._quarter_turns(h, w, out.device)[(k[idx] * 4) // self.n]  # (M, H*W)
            result[idx] = sub.reshape(m, c, h * w).gather(2, perm.unsqueeze(1).expand(m, c, -1)).view(m, c, h, w)
        if not bool(exact.all()):
            sel = (~exact).nonzero().squeeze(1)
            result[sel] = self._rotate_by_plan(out[sel], k[sel], padding)
        return result

    def _quarter_turns(self, h: int, w: int, device) -> torch.Tensor:
        """``(4, H*W)``: the source pixel of each output pixel under ``rot90`` by 0-3 quarter turns. Odd quarter
        turns need square images; for other images their rows are the identity (never used: ``act`` refuses)."""
        key = ("quarter", h, w, str(device))
        if key not in self._plans:
            pixels = torch.arange(h * w).view(h, w)
            turns = [torch.rot90(pixels, q, dims=(0, 1)).reshape(-1) if q % 2 == 0 or h == w else pixels.reshape(-1)
                     for q in range(4)]
            self._plans[key] = torch.stack(turns).to(device)
        return self._plans[key]

    def _rotate_by_plan(self, x: torch.Tensor, k: torch.Tensor, padding: Padding) -> torch.Tensor:
        """``rotate(x, k * 2pi/n)`` for square images, as a gather of the 4 bilinear neighbours with weights
        computed once per (rotation, size, padding, device, dtype) instead of a ``grid_sample`` per call.
        Differentiable in ``x``; the same values as :func:`rotate` up to float rounding."""
        b, c, h, w = x.shape
        index, weight = self._plan(h, w, padding, x.device, x.dtype)  # (n, 4*H*W), (n, 4, H*W)
        flat = F.pad(x.reshape(b, c, h * w), (0, 1))  # a zero at index H*W for neighbours off the image
        picked = flat.gather(2, index[k].unsqueeze(1).expand(b, c, -1)).view(b, c, 4, h * w)
        return (picked * weight[k].unsqueeze(1)).sum(2).view(b, c, h, w)

    def _plan(self, h: int, w: int, padding: Padding, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w, padding, str(device), dtype)
        if key not in self._plans:
            # grid_sample's own sampling points (align_corners=False), rebuilt in float64
            angle = torch.arange(self.n, dtype=torch.float64) * (2 * math.pi / self.n)
            cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(self.n, dtype=torch.float64)
            theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
            grid = F.affine_grid(_aspect_fix(theta, h, w), [self.n, 1, h, w], align_corners=False)
            ix, iy = ((grid[..., 0] + 1) * w - 1) / 2, ((grid[..., 1] + 1) * h - 1) / 2  # (n, H, W) pixels
            if padding == "border":
                ix, iy = ix.clamp(0, w - 1), iy.clamp(0, h - 1)
            x0, y0 = ix.floor(), iy.floor()
            fx, fy = ix - x0, iy - y0
            idx, wts = [], []
            for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                               (1, 1, fy * fx)):
                xx, yy = x0 + dx, y0 + dy
                inside = (xx >= 0) & (xx <= w - 1) & (yy >= 0) & (yy <= h - 1)
                idx.append(torch.where(inside, yy * w + xx, float(h * w)).long().flatten(1))
                wts.append(torch.where(inside, wt, 0.0).flatten(1))
            self._plans[key] = (torch.cat(idx, 1).to(device), torch.stack(wts, 1).to(device=device, dtype=dtype))
        return self._plans[key]

    def act_output(self, y: torch.Tensor, g: Elements, kind: OutputKind | str = OutputKind.INVARIANT,
                   *, padding: Padding = "border") -> torch.Tensor:
        """Transform a model output by ``g`` according to how that output is meant to transform.

        ``invariant``: returned unchanged. ``dense``: ``(B, C, H, W)``, acted on like an image.
        ``regular``: ``(B, C, |G|)`` or ``(B, C, |G|, H, W)``; channel ``h`` moves to ``g h`` and the spatial
        dims (if present) are acted on like an image.
        """
        kind = OutputKind(kind)
        if kind is OutputKind.INVARIANT:
            return y
        if kind is OutputKind.DENSE:
            return self.act(y, g, padding=padding)
        if y.dim() not in (3, 5) or y.shape[2] != self.order:
            raise ValueError(f"regular-representation outputs are (B, C, {self.order}[, H, W]) for {self.name}, "
                             f"got shape {tuple(y.shape)}")
        g_t = self._per_sample(g, y.shape[0], y.device)
        # (g.f)(h) = f(g^-1 h): output channel h reads input channel g^-1 h
        src = self.compose(self.inverse(g_t)[:, None], torch.arange(self.order, device=y.device)[None, :])  # (B, |G|)
        index = src.view(y.shape[0], 1, self.order, *([1] * (y.dim() - 3))).expand_as(y)
        permuted = torch.gather(y, 2, index)
        if y.dim() == 3:
            return permuted
        b, c, n, h, w = permuted.shape
        spatial = self.act(permuted.reshape(b, c * n, h, w), g_t, padding=padding)  # (B, C*|G|, H, W)
        return spatial.view(b, c, n, h, w)

    def orbit(self, x: torch.Tensor, *, padding: Padding = "border") -> torch.Tensor:
        """Every transformed copy of every image: ``(B, C, H, W)`` -> ``(B, |G|, C, H, W)``."""
        b = x.shape[0]
        rep = x.repeat_interleave(self.order, dim=0)  # (B*|G|, C, H, W), copies of one image adjacent
        g = torch.arange(self.order, device=x.device).repeat(b)
        return self.act(rep, g, padding=padding).view(b, self.order, *x.shape[1:])  # (B, |G|, C, H, W)

    # ---------------------------------------------------------------- helpers
    def _as_index(self, g: Elements) -> torch.Tensor:
        g_t = torch.as_tensor(g, dtype=torch.long)
        if g_t.numel() and (int(g_t.min()) < 0 or int(g_t.max()) >= self.order):
            raise ValueError(f"group elements of {self.name} are 0..{self.order - 1}, got {g_t.tolist()}")
        return g_t

    def _per_sample(self, g: Elements, batch: int, device) -> torch.Tensor:
        g_t = self._as_index(g).to(device)
        if g_t.dim() == 0:
            return g_t.expand(batch)
        if g_t.shape != (batch,):
            raise ValueError(f"need one group element or one per image ({batch}), got shape {tuple(g_t.shape)}")
        return g_t


def rotate(x: torch.Tensor, angle: torch.Tensor | float, *, padding: Padding = "border") -> torch.Tensor:
    """Rotate ``(B, C, H, W)`` images counter-clockwise by ``angle`` radians about their centre (bilinear).

    Differentiable in both ``x`` and ``angle``. For arbitrary angles; ``Group.act`` samples the same points from a
    cached plan for its own elements.
    Equivalent to pad (edge for ``border``, zeros for ``zeros``), rotate, centre-crop.
    """
    b = x.shape[0]
    angle = torch.as_tensor(angle, dtype=x.dtype, device=x.device)
    if angle.dim() == 0:
        angle = angle.expand(b)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Output pixel at normalized (u, v) = (col, row) samples the input at R(-angle) applied in display
    # orientation, where rows grow downward: a counter-clockwise turn as displayed.
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (B, 2, 3)
    theta = _aspect_fix(theta, x.shape[-2], x.shape[-1])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _aspect_fix(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if h == w:
        return theta
    scale = torch.tensor([[1.0, h / w], [w / h, 1.0]], dtype=theta.dtype, device=theta.device)
    out = theta.clone()
    out[:, :, :2] = theta[:, :, :2] * scale
    return out


# -------------------------------------------------------------------- registry
GROUP_FAMILIES: Registry[Callable[[int], Group]] = Registry("group family")


def register_group(prefix: str, *, overwrite: bool = False):
    """Register a family of groups under a one-letter prefix, e.g. ``C`` -> ``C4``, ``C8``."""
    return GROUP_FAMILIES.register(name=prefix.upper(), overwrite=overwrite)


@functools.lru_cache(maxsize=None)
def _make(n: int, reflections: bool) -> Group:
    return Group(n, reflections)


@register_group("C")
def cyclic(n: int) -> Group:
    """``C_n``: rotations by multiples of ``360/n`` degrees."""
    return _make(n, False)


@register_group("D")
def dihedral(n: int) -> Group:
    """``D_n``: rotations by multiples of ``360/n`` degrees and their compositions with a reflection."""
    return _make(n, True)


def trivial() -> Group:
    """The group with one element; every action is the identity."""
    return _make(1, False)


def get_group(name: str | Group) -> Group:
    """A group by name: ``"C4"``, ``"D8"``, ``"trivial"`` (``C1``)."""
    if isinstance(name, Group):
        return name
    key = str(name).strip().upper()
    if key in ("TRIVIAL", "E", "NONE"):
        return trivial()
    prefix, digits = key[:1], key[1:]
    if prefix not in GROUP_FAMILIES or not digits.isdigit() or int(digits) < 1:
        raise ValueError(f"unknown group {name!r}: use C<n> or D<n> with n >= 1 (e.g. C4, C8, D4) or 'trivial'")
    return GROUP_FAMILIES.get(prefix)(int(digits))


def list_groups() -> list[str]:
    """Registered group families and the names used in tests and example configs."""
    return ["trivial", "C2", "C4", "C8", "C16", "D1", "D2", "D4", "D8"]
