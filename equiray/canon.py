"""Canonicalization adapters: a small network picks a pose, the input is turned back, a pretrained model reads it.

``Phi(x) = c(x) . phi(c(x)^-1 . x)`` (Mondal et al. 2023): ``phi`` is any model (a timm model by name, frozen or
fine-tuned), ``c`` a canonicalizer that gives every input one score per group element. Two kinds, one interface:

* :class:`EquivariantCanonicalizer`: a group-equivariant conv net (rotation/reflection-shared filters built
  here from :mod:`equiray.groups`), so rotating the input by ``g`` permutes its scores: ``a(g.x)[h] = a(x)[g^-1 h]``.
* :class:`OptimizedCanonicalizer` (Panigrahi & Mondal 2024): any non-equivariant network embeds every transformed
  copy ``h^-1.x``; the score of ``h`` is the cosine similarity of that embedding with a reference vector. Because
  the scores run over the whole orbit the same permutation rule holds by construction.

Either way the chosen element ``c(x) = argmax_h a(x)[h]`` satisfies ``c(g.x) = g c(x)`` and the canonical input
``c(x)^-1 . x`` is the same for every ``g.x``: the wrapped model is invariant (or equivariant for dense outputs,
through :meth:`equiray.groups.Group.act_output`). Exact for C4/D4 (pixel-grid actions), approximate for other n
(interpolated rotations).

Training uses the straight-through argmax ``onehot(argmax a) + softmax(beta a) - softmax(beta a).detach()``. The
papers turn the one-hot into an angle and rotate by it; here the one-hot weights the ``|G|`` transformed copies
``h^-1.x`` directly, which is the same forward value (exact on the pixel grid for C4/D4 instead of an
interpolated rotation) and passes the same softmax gradient to the scores. The **canonicalization prior**
(:func:`prior_loss`) is the cross-entropy of the scores against the identity on upright data.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from equiray.errors import EquirayError
from equiray.groups import Group, OutputKind, get_group
from equiray.models import create_model, register_model

__all__ = ["Canonicalization", "Canonicalizer", "EquivariantCanonicalizer", "OptimizedCanonicalizer",
           "CanonicalizedModel", "GroupLiftConv", "GroupConv", "straight_through", "prior_loss",
           "contrastive_loss", "identity_rate", "create_canonicalizer", "list_canonicalizers",
           "register_canonicalizer"]


@dataclasses.dataclass(frozen=True)
class Canonicalization:
    """What a canonicalizer decided for a batch.

    ``inputs``: the canonical inputs ``c(x)^-1 . x`` (B, C, H, W); ``element``: the chosen element per input (B,);
    ``scores``: one score per group element (B, |G|); ``embeddings``: the optimized canonicalizer's unit-norm
    embeddings of every copy (B, |G|, D), for its contrastive loss (None for the equivariant one).
    """

    inputs: torch.Tensor
    element: torch.Tensor
    scores: torch.Tensor
    embeddings: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------- group convolutions
def _steerable_basis(kernel_size: int, group: Group, *, sigma: float = 0.6, max_frequency: int = 3) -> torch.Tensor:
    """Filter basis sampled from continuous functions, one copy per group element: (|G|, J, k, k).

    Basis function (ring r, frequency m): ``exp(-(rho - r)^2 / 2 sigma^2) * {cos, sin}(m phi)`` on the inscribed
    disk, with ``m`` up to ``min(r, max_frequency)`` (higher frequencies alias on a pixel ring). Element ``h`` (reflect, then rotate by theta) gets the
    functions evaluated at ``h^-1 p = F^s R(-theta) p``, so every element's filters are sampled alike: rotating a pixel
    filter by 45 degrees instead would blur the odd elements' filters and bias their scores. On the pixel grid
    (multiples of 90 degrees) this equals ``group.act`` on the filters exactly.
    """
    c = (kernel_size - 1) / 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - c
    u = coords[None, :].expand(kernel_size, kernel_size)  # right
    v = -coords[:, None].expand(kernel_size, kernel_size)  # up (rows grow downward)
    out = []
    for h in range(group.order):
        theta = float(group.angles(h))
        ru = math.cos(theta) * u + math.sin(theta) * v  # h^-1 p = F^s R(-theta) p
        rv = -math.sin(theta) * u + math.cos(theta) * v
        if bool(group.reflection(h)):
            ru = -ru
        rho = torch.sqrt(ru ** 2 + rv ** 2)
        phi = torch.where(rho > 1e-9, torch.atan2(rv, ru), torch.zeros_like(rho))
        centre = (rho > 1e-9).double()  # angular functions vanish at the centre, where phi is undefined
        funcs = []
        for r in range(int(c) + 1):
            radial = torch.exp(-((rho - r) ** 2) / (2 * sigma ** 2)) * (rho <= c + 0.5)
            funcs.append(radial)
            for m in range(1, min(r, max_frequency) + 1):
                funcs += [radial * centre * torch.cos(m * phi), radial * centre * torch.sin(m * phi)]
        out.append(torch.stack(funcs))
    basis = torch.stack(out)  # (|G|, J, k, k)
    exact = group.is_exact()
    # grid-exact elements: the exact pixel permutation of element 0's basis (no cos(pi/2) rounding)
    basis[exact] = group.act(basis[0].expand(int(exact.sum()), -1, -1, -1), torch.arange(group.order)[exact])
    return (basis / basis[0].flatten(1).norm(dim=1)[None, :, None, None]).float()


class _ExpandedWeightCache:
    """Inference reuses the expanded (|G|-fold) filter bank until the weights change (training rebuilds it every
    step, since the expansion is part of the graph)."""

    def cached(self, build):
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return build()
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device, self.weight.dtype)
        if getattr(self, "_cache_key", None) != key:
            self._cache_key, self._cache = key, build().detach()
        return self._cache


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


class GroupLiftConv(_ExpandedWeightCache, nn.Module):
    """Lifting convolution Z^2 -> G: output channel (o, h) correlates the input with ``h . W_o``.

    Output (B, O, |G|, H, W); rotating the input by ``g`` rotates the maps by ``g`` and moves channel ``h`` to
    ``g h`` (the regular representation).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, group: Group):
        super().__init__()
        if kernel_size % 2 == 0:
            raise EquirayError(f"group convolutions need an odd kernel size (centred filters), got {kernel_size}")
        self.group, self.kernel_size = group, kernel_size
        self.register_buffer("basis", _steerable_basis(kernel_size, group), persistent=False)  # (|G|, J, k, k)
        j = self.basis.shape[1]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, j) * math.sqrt(2.0 / (in_channels * j)))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def expanded_weight(self) -> torch.Tensor:
        o, i, _ = self.weight.shape
        k = self.kernel_size
        w = torch.einsum("oij,hjxy->ohixy", self.weight, self.basis)  # (O, |G|, I, k, k): filter h . W_o
        return w.reshape(o * self.group.order, i, k, k)  # (O*|G|, I, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.group.order
        y = F.conv2d(x, self.cached(self.expanded_weight), self.bias.repeat_interleave(n), padding=self.kernel_size // 2)
        return y.view(x.shape[0], -1, n, *y.shape[-2:])  # (B, O, |G|, H, W)


class GroupConv(_ExpandedWeightCache, nn.Module):
    """Group convolution G -> G: ``out(h) = sum_u conv(in(u), h . W[h^-1 u])``; equivariant in the same sense."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, group: Group):
        super().__init__()
        if kernel_size % 2 == 0:
            raise EquirayError(f"group convolutions need an odd kernel size (centred filters), got {kernel_size}")
        self.group, self.kernel_size = group, kernel_size
        n = group.order
        self.register_buffer("basis", _steerable_basis(kernel_size, group), persistent=False)  # (|G|, J, k, k)
        j = self.basis.shape[1]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, n, j) * math.sqrt(2.0 / (in_channels * n * j)))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        h = torch.arange(n)
        self.register_buffer("_index", group.compose(group.inverse(h)[:, None], h[None, :]), persistent=False)

    def expanded_weight(self) -> torch.Tensor:
        o, i, n, _ = self.weight.shape
        k = self.kernel_size
        w = self.weight[:, :, self._index]  # (O, I, |G|h, |G|u, J): W[h^-1 u]
        w = torch.einsum("oihuj,hjxy->ohiuxy", w, self.basis)  # (O, |G|h, I, |G|u, k, k): h . W[h^-1 u]
        return w.reshape(o * n, i * n, k, k)  # (O*|G|, I*|G|, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n, hh, ww = x.shape
        if n != self.group.order or c != self.weight.shape[1]:
            raise ValueError(f"expected (B, {self.weight.shape[1]}, {self.group.order}, H, W), got {tuple(x.shape)}")
        y = F.conv2d(x.reshape(b, c * n, hh, ww), self.cached(self.expanded_weight), self.bias.repeat_interleave(n),
                     padding=self.kernel_size // 2)
        return y.view(b, -1, n, hh, ww)  # (B, O, |G|, H, W)


# ----------------------------------------------------------------------------------------- canonicalizers
def _disk(size: int, device=None) -> torch.Tensor:
    """Weights of the inscribed disk (1 inside, 0 outside): a rotation-invariant pooling domain."""
    r = (torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2)
    d2 = r[:, None] ** 2 + r[None, :] ** 2
    return (d2 <= (size / 2) ** 2).float()


class Canonicalizer(nn.Module):
    """Base: ``scores(x) -> (B, |G|)`` obeying ``scores(g.x)[h] = scores(x)[g^-1 h]``.

    ``input_size`` resizes what the canonicalizer sees (area resampling, which commutes with the square's
    symmetries); ``crop`` keeps that fraction of the centre first. The backbone always sees the full input.
    """

    kind: str = "base"

    def __init__(self, group: Group | str, *, input_size: int | None = None, crop: float = 1.0):
        super().__init__()
        self.group = get_group(group)
        if not 0.0 < crop <= 1.0:
            raise EquirayError(f"crop is the kept centre fraction, in (0, 1], got {crop}")
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
        if self.input_size is not None and x.shape[-1] != self.input_size:
            h, w = x.shape[-2:]
            if h == w and h % self.input_size == 0:  # the same average, without adaptive pooling's bookkeeping
                x = F.avg_pool2d(x, h // self.input_size)
            else:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        return x

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (B, |G|), embeddings (B, |G|, D) or None) for prepared inputs."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.prepare(x))[0]


class EquivariantCanonicalizer(Canonicalizer):
    """Mondal et al.'s canonicalizer: lifting conv, ``layers - 1`` group convs, ReLUs; scores are the feature maps
    averaged over channels and the inscribed disk (so rotations by other than 90 degrees lose no corners).

    The defaults keep it cheap next to a backbone: the hidden group convs are 1x1 (a |G| x |G| channel mixing per
    pixel; ``hidden_kernel_size=3`` costs ~|G| times more), and ``input_size`` lets it read a downsampled copy.
    ``batch_norm`` (statistics shared over group elements and pixels) and ``dropout`` after each hidden group
    conv regularise its choice as in equiadapt's network; ``equiray canon sweep`` turns both on. A 1x1 last group
    conv runs after the pooling; at inference every batch norm is folded into the conv before it (:meth:`_folded`).
    """

    kind = "equivariant"

    def __init__(self, group: Group | str, *, in_chans: int = 1, channels: int = 8, layers: int = 2,
                 kernel_size: int = 5, hidden_kernel_size: int = 1, input_size: int | None = None,
                 crop: float = 1.0, batch_norm: bool = False, dropout: float = 0.0):
        super().__init__(group, input_size=input_size, crop=crop)
        if layers < 1 or channels < 1:
            raise EquirayError(f"need at least one layer and one channel, got layers={layers}, channels={channels}")
        if not 0.0 <= dropout < 1.0:
            raise EquirayError(f"dropout is a probability in [0, 1), got {dropout}")
        blocks: list[nn.Module] = [GroupLiftConv(in_chans, channels, kernel_size, self.group)]
        for _ in range(layers - 1):
            if batch_norm:  # statistics per channel, shared over group elements and pixels: equivariant
                blocks.append(nn.BatchNorm3d(channels))
            blocks.append(nn.ReLU())
            if dropout:
                blocks.append(nn.Dropout(dropout))
            blocks.append(GroupConv(channels, channels, hidden_kernel_size, self.group))
        self.net = nn.Sequential(*blocks)

    def score(self, x):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"the canonicalizer needs square inputs, got {tuple(x.shape[-2:])}")
        if not torch.is_grad_enabled() and not any(m.training for m in self.net):
            return self._score_folded(x), None
        disk = _disk(x.shape[-1], x.device)
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
        key = (size, str(device), dtype, *((t._version, t.data_ptr()) for t in state))
        if getattr(self, "_folded_key", None) != key:
            n = self.group.order
            mods = [m for m in self.net if not isinstance(m, (nn.ReLU, nn.Dropout))]
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
            disk = _disk(size, device).to(dtype).flatten()
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
    ``h^-1.x``; ``score[h] = cos(f(h^-1.x), r)`` with a reference ``r`` (fixed random, or learned)."""

    kind = "optimized"

    def __init__(self, group: Group | str, *, in_chans: int = 1, network: str = "small_cnn",
                 network_kwargs: dict | None = None, embed_dim: int = 32, learn_reference: bool = False,
                 input_size: int | None = None, crop: float = 1.0):
        super().__init__(group, input_size=input_size, crop=crop)
        self.net = create_model(network, in_chans=in_chans, num_classes=embed_dim, **dict(network_kwargs or {}))
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


_CANONICALIZERS: dict[str, Callable[..., Canonicalizer]] = {}


def register_canonicalizer(name: str, factory: Callable[..., Canonicalizer]) -> None:
    _CANONICALIZERS[name] = factory


register_canonicalizer("equivariant", EquivariantCanonicalizer)
register_canonicalizer("optimized", OptimizedCanonicalizer)


def list_canonicalizers() -> list[str]:
    return sorted(_CANONICALIZERS)


def create_canonicalizer(kind: str, group: Group | str, **kwargs) -> Canonicalizer:
    if kind not in _CANONICALIZERS:
        raise EquirayError(f"unknown canonicalizer {kind!r}; choose one of {', '.join(list_canonicalizers())}")
    try:
        return _CANONICALIZERS[kind](group, **kwargs)
    except TypeError as exc:
        raise EquirayError(f"canonicalizer {kind!r} does not take these options {sorted(kwargs)}: {exc}") from None


# ----------------------------------------------------------------------------------------- losses and choice
def straight_through(scores: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Hard one-hot of the argmax in the forward pass, ``softmax(beta * scores)``'s gradient in the backward."""
    soft = torch.softmax(beta * scores, dim=-1)
    hard = F.one_hot(scores.argmax(-1), scores.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def prior_loss(scores: torch.Tensor, group: Group, *, beta: float = 1.0) -> torch.Tensor:
    """The canonicalization prior: cross-entropy of ``beta * scores`` against the identity (use on upright data)."""
    target = torch.full((scores.shape[0],), group.identity, dtype=torch.long, device=scores.device)
    return F.cross_entropy(beta * scores, target)


def contrastive_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean absolute off-diagonal of ``V V^T`` per input (V: unit embeddings of the |G| copies): pushes the copies
    apart so the argmax is unique (Panigrahi & Mondal)."""
    sim = embeddings @ embeddings.transpose(-1, -2)  # (B, |G|, |G|)
    n = sim.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    return sim[:, off].abs().mean()


def identity_rate(element: torch.Tensor, group: Group) -> float:
    """Share of inputs mapped to the identity (on upright data: how often the canonicalizer leaves them alone)."""
    return float((element == group.identity).float().mean()) if element.numel() else float("nan")


# ----------------------------------------------------------------------------------------- the wrapper
class CanonicalizedModel(nn.Module):
    """A backbone behind a canonicalizer: invariant (``output="invariant"``, class logits) or equivariant
    (``"dense"`` maps, ``"regular"`` channels) by construction.

    ``forward`` returns the backbone's output mapped back by ``c(x)``; :meth:`canonicalize` and
    :meth:`forward_with_info` also return the chosen element per input. ``padding`` fills the corners that a
    rotation by other than 90 degrees brings in: ``zeros`` suits objects on a blank background (replicating the
    border smears any edge that touches it into streaks), ``border`` suits natural images.
    """

    def __init__(self, backbone: nn.Module, canonicalizer: Canonicalizer, *,
                 output: OutputKind | str = OutputKind.INVARIANT, beta: float = 1.0,
                 padding: Literal["border", "zeros"] = "zeros"):
        super().__init__()
        self.backbone, self.canonicalizer = backbone, canonicalizer
        self.output, self.beta, self.padding = OutputKind(output), float(beta), padding

    @property
    def group(self) -> Group:
        return self.canonicalizer.group

    def canonicalize(self, x: torch.Tensor) -> Canonicalization:
        if x.dim() != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        g = self.group
        scores, emb = self.canonicalizer.score(self.canonicalizer.prepare(x))
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
        out = self.backbone(info.inputs)
        return self.group.act_output(out, info.element, self.output, padding=self.padding), info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_info(x)[0]


@register_model
def canonicalized(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
                  backbone: str = "resnet8", backbone_kwargs: dict | None = None,
                  canonicalizer: str = "equivariant", canonicalizer_kwargs: dict | None = None,
                  group: str = "C8", beta: float = 1.0, output: str = "invariant",
                  padding: str = "zeros") -> nn.Module:
    """A backbone (equiray or timm name) behind a canonicalizer, as one model (weights: ``equiray canon sweep``)."""
    net = create_model(backbone, in_chans=in_chans, num_classes=num_classes, pretrained=pretrained,
                       **dict(backbone_kwargs or {}))
    canon = create_canonicalizer(canonicalizer, group, in_chans=in_chans, **dict(canonicalizer_kwargs or {}))
    return CanonicalizedModel(net, canon, output=output, beta=beta, padding=padding)
