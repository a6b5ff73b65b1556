"""Canonicalizers: a small network gives every input one score per group element, ``a(x) (B, |G|)``, obeying
``a(g.x)[h] = a(x)[g^-1 h]``, so that the chosen element ``c(x) = argmax_h a(x)[h]`` satisfies ``c(g.x) = g c(x)``.

* :class:`EquivariantCanonicalizer` (Mondal et al. 2023): a group-equivariant conv net (:mod:`equiray.canon.layers`).
* :class:`OptimizedCanonicalizer` (Panigrahi & Mondal 2024): any network embeds every transformed copy ``h^-1.x``;
  the score of ``h`` is the cosine similarity of that embedding with a reference vector (equivariant by
  construction, since the scores run over the whole orbit).

Both are registered in :data:`CANONICALIZERS`, so configs name them by string (:func:`create_canonicalizer`).
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.canon.layers import GroupConv, GroupLiftConv, version_key
from equiray.errors import EquirayError
from equiray.groups import Group, get_group
from equiray.models import create_model
from equiray.registry import Registry

__all__ = ["AUTO_INPUT_PX", "Canonicalizer", "EquivariantCanonicalizer", "OptimizedCanonicalizer", "CANONICALIZERS",
           "InputSize", "canonicalizer_input_size", "create_canonicalizer", "list_canonicalizers",
           "register_canonicalizer"]

InputSize = int | Literal["auto", "full"] | None
AUTO_INPUT_PX = 64  # "auto": images wider than this are averaged down to at most this many pixels


def canonicalizer_input_size(input_size: InputSize, image_px: int) -> int:
    """The side the canonicalizer reads for an ``image_px``-wide input.

    ``"auto"`` (the default): the image itself up to :data:`AUTO_INPUT_PX` pixels, above that the image averaged
    down by the smallest whole factor that brings it under (224 -> 56, 96 -> 48, 28 -> 28), so the canonicalizer's
    cost stays a small share of a backbone that reads the full image. ``"full"`` or None: the full image. An
    integer: that side.
    """
    if input_size is None or input_size == "full":
        return image_px
    if input_size == "auto":
        return image_px // math.ceil(image_px / AUTO_INPUT_PX)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise EquirayError(f"input_size is a side in pixels, 'auto' or 'full', got {input_size!r}")
    return input_size


def _disk(size: int, device=None) -> torch.Tensor:
    """Weights of the inscribed disk (1 inside, 0 outside): a rotation-invariant pooling domain."""
    r = (torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2)
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return (d2 <= (size / 2) ** 2).float()


class Canonicalizer(nn.Module):
    """Base: ``scores(x) -> (B, |G|)`` obeying ``scores(g.x)[h] = scores(x)[g^-1 h]``.

    ``input_size`` resizes what the canonicalizer sees (area resampling, which commutes with the square's
    symmetries; :func:`canonicalizer_input_size`: by default images above 64 px are averaged down, a side in
    pixels or ``"full"`` otherwise); ``crop`` keeps that fraction of the centre first. The backbone always sees
    the full input.
    """

    kind: str = "base"

    def __init__(self, group: Group | str, *, input_size: InputSize = "auto", crop: float = 1.0):
        super().__init__()
        self.group = get_group(group)
        if not 0.0 < crop <= 1.0:
            raise EquirayError(f"crop is the kept centre fraction, in (0, 1], got {crop}")
        canonicalizer_input_size(input_size, AUTO_INPUT_PX)  # an invalid value fails here, not at the first batch
        self.input_size, self.crop = input_size, crop

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop < 1.0:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        # NCHW strides for the canonicalizer's own small convolutions: decoded images are channels-last, and
        # for one channel that is a free re-view; pooling and the lifting conv run 2-5x faster on it here
        x = x.reshape(-1, *x.shape[-2:]).view(x.shape)
        side = canonicalizer_input_size(self.input_size, x.shape[-1])
        if x.shape[-1] != side or x.shape[-2] != side:
            h, w = x.shape[-2:]
            if h == w and h % side == 0:  # the same average, without adaptive pooling's bookkeeping
                x = F.avg_pool2d(x, h // side)
            else:
                x = F.interpolate(x, size=(side, side), mode="area")
        return x

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (B, |G|), embeddings (B, |G|, D) or None) for prepared inputs."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.prepare(x))[0]


def _bn_affine(bn: nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """An inference-mode batch norm as ``y * scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    return scale, shift


def _scaled(weight: torch.Tensor, bias: torch.Tensor, n: int, scale: torch.Tensor | None,
            shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Expanded (O*|G|, ...) filters and their bias, with a per-output-channel affine (a batch norm) folded in."""
    bias = bias.repeat_interleave(n)
    if scale is None:
        return weight, bias
    s = scale.repeat_interleave(n)
    return weight * s.view(-1, *([1] * (weight.dim() - 1))), bias * s + shift.repeat_interleave(n)



class _GroupAvgPool(nn.Module):
    """Average pooling of group feature maps (B, C, |G|, H, W) by ``factor`` over the pixels: exact under the
    square's symmetries about the centre when ``factor`` divides the size (a widened view for the next layer)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n, h, w = x.shape
        return F.avg_pool2d(x.reshape(b, c * n, h, w), self.factor).view(b, c, n, h // self.factor, w // self.factor)


class EquivariantCanonicalizer(Canonicalizer):
    """Mondal et al.'s canonicalizer: lifting conv, ``layers - 1`` group convs, ReLUs; scores are the feature maps
    averaged over channels and the inscribed disk (so rotations by other than 90 degrees lose no corners).

    The defaults keep it cheap next to a backbone: the hidden group convs are 1x1 (a |G| x |G| channel mixing per
    pixel; ``hidden_kernel_size=3`` costs ~|G| times more), and ``input_size`` lets it read a downsampled copy.
    ``batch_norm`` (statistics shared over group elements and pixels) and ``dropout`` after each hidden group
    conv regularise its choice as in equiadapt's network; ``equiray canon sweep`` turns both on. A 1x1 last group
    conv runs after the pooling; at inference every batch norm is folded into the conv before it (:meth:`_folded`).
    ``pool``: average the lifting conv's maps over ``pool`` x ``pool`` pixels before the next layer (the input size
    a multiple of it), so that ``hidden_kernel_size=3`` layers see the object's layout (which end is the top, which
    way a shoe points) at a ``pool**2``-th of the cost; with 1x1 hidden convs every score is an average of
    features no wider than the lifting filter.
    """

    kind = "equivariant"

    def __init__(self, group: Group | str, *, in_chans: int = 1, channels: int = 8, layers: int = 2,
                 kernel_size: int = 5, hidden_kernel_size: int = 1, input_size: InputSize = "auto",
                 crop: float = 1.0, batch_norm: bool = False, dropout: float = 0.0, pool: int = 1):
        super().__init__(group, input_size=input_size, crop=crop)
        if layers < 1 or channels < 1:
            raise EquirayError(f"need at least one layer and one channel, got layers={layers}, channels={channels}")
        if not 0.0 <= dropout < 1.0:
            raise EquirayError(f"dropout is a probability in [0, 1), got {dropout}")
        if pool < 1 or (pool > 1 and layers < 2):
            raise EquirayError(f"pool is a factor >= 1 between the lifting conv and the next layer (layers >= 2), "
                               f"got pool={pool}, layers={layers}")
        self.pool = pool
        blocks: list[nn.Module] = [GroupLiftConv(in_chans, channels, kernel_size, self.group)]
        for i in range(layers - 1):
            if batch_norm:  # statistics per channel, shared over group elements and pixels: equivariant
                blocks.append(nn.BatchNorm3d(channels))
            blocks.append(nn.ReLU())
            if i == 0 and pool > 1:
                blocks.append(_GroupAvgPool(pool))
            if dropout:
                blocks.append(nn.Dropout(dropout))
            blocks.append(GroupConv(channels, channels, hidden_kernel_size, self.group))
        self.net = nn.Sequential(*blocks)

    def score(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"the canonicalizer needs square inputs, got {tuple(x.shape[-2:])}")
        if x.shape[-1] % self.pool:
            raise ValueError(f"pool={self.pool} needs an input size that is a multiple of it, got {x.shape[-1]} "
                             f"(set input_size)")
        if not torch.is_grad_enabled() and not any(m.training for m in self.net):
            return self._score_folded(x), None
        disk = _disk(x.shape[-1] // self.pool, x.device)
        last = self.net[-1]
        if isinstance(last, GroupConv) and last.kernel_size == 1:
            # A 1x1 group conv is linear per pixel, so averaging over the disk commutes with it: pool first, then
            # apply it as one (O|G| x C|G|) matrix. Same scores, without the per-pixel channel mixing.
            feats = self.net[:-1](x)  # (B, C, |G|, H, W)
            pooled = (feats * disk).sum((-2, -1)) / disk.sum()  # (B, C, |G|)
            weight = last.cached(last.expanded_weight).flatten(1)  # (O*|G|, C*|G|)
            out = F.linear(pooled.flatten(1), weight, last.bias.repeat_interleave(self.group.order))
            return out.view(x.shape[0], -1, self.group.order).mean(1), None  # (B, |G|)
        feats = self.net(x)  # (B, O, |G|, H, W)
        scores = (feats * disk).sum((-2, -1)).mean(1) / disk.sum()  # (B, |G|)
        return scores, None

    # oneDNN's CPU convolutions run this network's shapes 3x slower (per image) on batches above ~200 than on
    # batches of 128 (measured here for 7x7 and 14x14 inputs), so CPU inference goes through in chunks; the
    # factored lifting conv (:meth:`_factored_lift`) runs best in chunks of 256 (7x7 and 9x9 inputs)
    _CPU_CHUNK, _CPU_CHUNK_FACTORED = 128, 256

    def _score_folded(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the same scores from constants folded once (:meth:`_folded`), in a handful of ops."""
        convs, pool, last, lift = self._folded(x.shape[-1], x.device, x.dtype)
        chunk = self._CPU_CHUNK if lift is None else self._CPU_CHUNK_FACTORED
        if x.device.type == "cpu" and x.shape[0] > chunk:
            return torch.cat([self._score_chunk(c, convs, pool, last, lift) for c in x.split(chunk)])
        return self._score_chunk(x, convs, pool, last, lift)

    def _score_chunk(self, x: torch.Tensor, convs: list, pool: torch.Tensor, last: tuple | None,
                     lift: tuple | None) -> torch.Tensor:
        b = x.shape[0]
        if lift is not None:  # the lifting conv as J basis filters, then one matrix (J -> C*|G|) per pixel
            basis, mix, bias = lift
            r = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), basis, padding=basis.shape[-1] // 2)  # (B*I, J, H, W)
            r = r.view(b, mix.shape[0], -1).transpose(1, 2)  # (B, H*W, I*J)
            h = torch.addmm(bias, r.reshape(-1, mix.shape[0]), mix)  # (B*H*W, C*|G|)
            if last is not None:
                h = h.relu_()
            pooled = torch.bmm(pool.view(1, 1, -1).expand(b, 1, -1), h.view(b, -1, mix.shape[1])).squeeze(1)
        else:
            for i, (weight, bias, padding) in enumerate(convs):
                x = F.conv2d(x, weight, bias, padding=padding)
                if last is not None or i < len(convs) - 1:  # a ReLU follows every group conv but the last
                    x = x.relu_()
                if i == 0 and self.pool > 1:
                    x = F.avg_pool2d(x, self.pool)
            pooled = x.flatten(2) @ pool  # (B, C*|G|): the disk average of every channel
        if last is None:  # the last conv was spatial: average its channels
            return pooled.view(b, -1, self.group.order).mean(1)
        return F.linear(pooled, *last)  # (B, |G|)

    def _folded(self, size: int, device, dtype) -> tuple[list, torch.Tensor, tuple | None, tuple | None]:
        """Eval-time constants, rebuilt whenever a weight or a running statistic changes (an optimizer step, a
        loaded state): every group conv expanded to a plain conv with the batch norm after it folded in, the disk
        average as a vector over pixels, a 1x1 last group conv with the mean over its output channels folded in, as
        one (|G|, C*|G|) matrix applied after the pooling, and the lifting conv factored (:meth:`_factored_lift`)."""
        state = [*self.net.parameters(), *self.net.buffers()]
        key = (size, str(device), dtype, *(version_key(t) for t in state))
        if getattr(self, "_folded_key", None) != key:
            n = self.group.order
            mods = [m for m in self.net if not isinstance(m, (nn.ReLU, nn.Dropout, _GroupAvgPool))]
            convs = []
            for i, m in enumerate(mods):
                if isinstance(m, nn.BatchNorm3d):
                    continue
                bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm3d) else None
                weight, bias = _scaled(m.expanded_weight(), m.bias, n, *(_bn_affine(bn) if bn else (None, None)))
                convs.append((weight.to(device, dtype), bias.to(device, dtype), m.kernel_size // 2))
            last = None
            if isinstance(mods[-1], GroupConv) and mods[-1].kernel_size == 1:
                weight, bias, _ = convs.pop()
                o = weight.shape[0] // n
                last = (weight.flatten(1).view(o, n, -1).mean(0), bias.view(o, n).mean(0))  # (|G|, C*|G|), (|G|,)
            disk = _disk(size // self.pool, device).to(dtype).flatten()
            self._folded_key, self._folded_value = key, (convs, disk / disk.sum(), last, self._factored_lift(convs))
        return self._folded_value

    def _factored_lift(self, convs: list) -> tuple | None:
        """The folded lifting conv as (basis filters (J, 1, k, k), mixing matrix (I*J, C*|G|), bias), when it is the
        only spatial conv. Every element's filter is a combination of the identity's J basis functions (rotating a
        ring times cos/sin(m phi) mixes cos and sin of the same m), so the conv runs J filters instead of C*|G|:
        fewer operations, and most of them one matrix product (CPU only). ``None`` if the filters leave the span."""
        weight, bias, _ = convs[0]
        if len(convs) != 1 or weight.device.type != "cpu":  # a GPU runs the plain conv well
            return None
        basis = self.net[0].basis[0].to(torch.float64)  # (J, k, k)
        oc, ic, k, _ = weight.shape
        flat, span = weight.to(torch.float64).reshape(oc * ic, k * k), basis.flatten(1)
        mix = torch.linalg.lstsq(span.T, flat.T).solution.T  # (O*I, J)
        if (mix @ span - flat).abs().max() > 1e-5 * max(float(flat.abs().max()), 1e-12):
            return None
        mix = mix.view(oc, ic, -1).permute(1, 2, 0).reshape(-1, oc)  # (I*J, O): rows in the basis conv's order
        return (basis.unsqueeze(1).to(weight.device, weight.dtype), mix.to(weight.device, weight.dtype), bias)


class OptimizedCanonicalizer(Canonicalizer):
    """Panigrahi & Mondal's canonicalizer: ``network`` (an equiray or timm model name) embeds each copy
    ``h^-1.x``; ``score[h] = cos(f(h^-1.x), r)`` with a reference ``r`` (fixed random, or learned).

    It runs its network once per group element, so it costs |G| network passes where the equivariant
    canonicalizer shares one lifting conv across the group: the default network is the smallest the canon sweep
    found level in accuracy with the equivariant one (``small_cnn`` of width 4, a 16-d embedding; width 16 cost 4x
    more, BENCHMARKS.md "canonicalizer cost")."""

    kind = "optimized"

    def __init__(self, group: Group | str, *, in_chans: int = 1, network: str = "small_cnn",
                 network_kwargs: dict | None = None, embed_dim: int = 16, learn_reference: bool = False,
                 input_size: InputSize = "auto", crop: float = 1.0):
        super().__init__(group, input_size=input_size, crop=crop)
        if network_kwargs is None:
            network_kwargs = {"width": 4} if network == "small_cnn" else {}
        self.net = create_model(network, in_chans=in_chans, num_classes=embed_dim, **network_kwargs)
        ref = torch.randn(embed_dim, generator=torch.Generator().manual_seed(0))
        if learn_reference:
            self.reference = nn.Parameter(ref)
        else:
            self.register_buffer("reference", ref)

    def score(self, x):
        g = self.group
        b = x.shape[0]
        inv = g.inverse(torch.arange(g.order, device=x.device)).repeat(b)
        copies = g.act(x.repeat_interleave(g.order, dim=0), inv, padding="zeros")  # (B*|G|, C, H, W): h^-1.x
        emb = F.normalize(self.net(copies).view(b, g.order, -1), dim=-1)  # (B, |G|, D)
        scores = emb @ F.normalize(self.reference, dim=0)  # (B, |G|)
        return scores, emb


CANONICALIZERS: Registry[Callable[..., Canonicalizer]] = Registry("canonicalizer")


def register_canonicalizer(name: str, factory: Callable[..., Canonicalizer], *, overwrite: bool = False) -> None:
    """Register ``factory(group, **options) -> Canonicalizer`` under ``name``; a name taken already is refused
    unless ``overwrite``."""
    CANONICALIZERS.register(factory, name=name, overwrite=overwrite)


register_canonicalizer("equivariant", EquivariantCanonicalizer)
register_canonicalizer("optimized", OptimizedCanonicalizer)


def list_canonicalizers() -> list[str]:
    return CANONICALIZERS.names()


def create_canonicalizer(kind: str, group: Group | str, **kwargs) -> Canonicalizer:
    """The canonicalizer registered as ``kind`` for ``group``; an unknown kind or option is an
    :class:`~equiray.errors.EquirayError` that names the choices."""
    return CANONICALIZERS.create(kind, group, **kwargs)
