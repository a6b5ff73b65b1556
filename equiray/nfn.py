"""Monomial-NFN: metanetworks on the weights of small networks that respect permutation *and* scaling symmetries.

Tran, Vo, Tran-Huu, Nguyen & Nguyen, "Monomial Matrix Group Equivariant Neural Functional Networks", NeurIPS
2024 (arXiv:2409.11697). A zoo network with L layers has weights ``W_i`` (n_i, n_{i-1}[, kh, kw]) and biases
``b_i`` (n_i,). Its hidden units (layers 1..L-1) can be permuted and rescaled without changing its function::

    (gW)_i[j, k] = d_i[j] / d_{i-1}[k] * W_i[pi_i(j), pi_{i-1}(k)]        (S1)
    (gb)_i[j]    = d_i[j] * b_i[pi_i(j)]                                  (S2)

with ``pi_0 = pi_L = id`` and ``d_0 = d_L = 1``; ``d > 0`` for ReLU nets (group ``"positive"``), ``d = +-1`` for
tanh nets (group ``"sign"``). Metanetwork features carry a channel axis: (B, C, n_i, n_{i-1}[, kh, kw]).

**Equivariant linear layer.** A linear map commuting with the diagonal part of (S1, S2) may only connect entries
whose scale factors are the same monomial in the ``d``; the permutations then tie the coefficients along the
permuted axes. What survives (``A``, ``B``, ``E``, ... are C_out x C_in channel matrices; kernel positions are
fixed axes, folded into the input channels, so spatial mixing is free and the output has no spatial axes)::

    first  W'_1[j,k] = A W_1[j,k] + B sum_k' M[k,k'] W_1[j,k'] + G g[k] b_1[j]       (E1)
           b'_1[j]   = E b_1[j] + H sum_k h[k] W_1[j,k]                              (E2)
    hidden W'_i[j,k] = A W_i[j,k],   b'_i[j] = E b_i[j]            (1 < i < L)        (E3)
    last   W'_L[j,k] = A W_L[j,k] + B sum_j' M[j,j'] W_L[j',k]                        (E4)
           b'_L[j]   = E b_L[j] + F sum_j' N[j,j'] b_L[j'] + t[j]                     (E5)

``M``, ``N`` (n x n along a fixed axis) and ``g``, ``h`` (vectors along it) are learned. The fully general map
allows a separate n x n matrix per channel pair; (E1, E4, E5) use a factorised subspace of it (channel matrix
times one axis matrix) so the parameter count does not grow with ``C^2 n^2``. Nothing connects two different
layers for positive scalings, and no bias may be added anywhere except ``t`` (``b_L`` is the only invariant).
For sign flips ``1/d = d``, so ``W_L[:, k]`` and ``b_{L-1}[k]`` carry the same character and one more coupling is
allowed (and used)::

    W'_L[j,k] += Q q[j] b_{L-1}[k],   b'_{L-1}[k] += R sum_j r[j] W_L[j,k]          (E6, sign group only)

Nonlinearities between layers: ReLU (commutes with d > 0) for ``"positive"``, tanh (odd, commutes with d = +-1)
for ``"sign"``.

**Invariant layer.** Each entry's channel vector ``v`` is made scale-free: ``gamma * v / ||v|| + beta``
(positive; ``||d v|| = d ||v||``) or ``|P v| + beta`` (sign; even in ``v``, keeps the magnitude because tanh nets
have no scale symmetry). Then the mean over the permuted axes, keeping the fixed ones (input axis of W_1, output
axis of W_L and b_L), and an MLP head.

Limitation inherited from the paper's layer: for positive scalings the layers never connect two layers, so a
Monomial-NFN cannot tell a symmetry from an *uncoupled* permutation of two consecutive layers (only ``W_1 <-> b_1``,
and for sign flips ``b_{L-1} <-> W_L``, are tied).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn as nn

from equiray.errors import EquirayError

__all__ = ["LayerSpec", "NetworkSpec", "WeightSpaceFeatures", "WeightSymmetry", "ZooCNN", "zoo_cnn",
           "features_from_models", "features_from_state_dicts", "load_features_into", "random_symmetry",
           "apply_symmetry", "FirstLayerMap", "HiddenLayerMap", "LastLayerMap", "SignCoupling", "MonomialLinear",
           "FeatureActivation", "MonomialInvariantPool", "MonomialNFN", "StatNN", "register_metanetwork",
           "create_metanetwork", "list_metanetworks", "count_parameters", "features_from_normalized_cnns", "kendall_tau", "MetaFit",
           "fit_metanetwork", "predict", "path_norms"]

ScalingGroup = Literal["positive", "sign"]
Symmetry = Literal["positive", "sign", "permutation"]
SCALING_GROUPS: tuple[str, ...] = ("positive", "sign")
SYMMETRIES: tuple[str, ...] = ("positive", "sign", "permutation")


# ----------------------------------------------------------------------------------------- containers
@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a zoo network: ``W`` (out_features, in_features, *kernel_size), ``b`` (out_features,)."""

    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))
        if self.out_features < 1 or self.in_features < 1 or any(k < 1 for k in self.kernel_size):
            raise EquirayError(f"layer sizes must be positive, got {self}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    @property
    def spatial_size(self) -> int:
        return math.prod(self.kernel_size)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """The layer shapes of a zoo architecture. Axis roles of ``W_i`` (0-based layer index ``i``): the output axis
    is permuted unless ``i`` is the last layer, the input axis unless ``i`` is the first; kernel axes are fixed."""

    layers: tuple[LayerSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise EquirayError("a NetworkSpec needs at least one layer")
        for i in range(1, len(self.layers)):
            if self.layers[i].in_features != self.layers[i - 1].out_features:
                raise EquirayError(
                    f"layer {i} reads {self.layers[i].in_features} units but layer {i - 1} writes "
                    f"{self.layers[i - 1].out_features}: only plain stacks are supported (CNNs must end in global "
                    "average pooling before the linear layer, not a flatten)")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """Sizes n_1..n_{L-1} of the permuted/scaled hidden layers."""
        return tuple(layer.out_features for layer in self.layers[:-1])

    def permuted_axes(self, index: int) -> tuple[int, ...]:
        """Axes of ``W_index`` (n_i, n_{i-1}, ...) that the group permutes (0: output, 1: input)."""
        return tuple(a for a, ok in ((0, index < self.num_layers - 1), (1, index > 0)) if ok)

    def without_spatial(self) -> NetworkSpec:
        """The spec of features whose kernel axes have been folded into channels (an equivariant layer's output)."""
        return NetworkSpec(tuple(LayerSpec(s.out_features, s.in_features) for s in self.layers))

    def check(self, features: WeightSpaceFeatures, *, channels: int | None = None) -> None:
        """Raise :class:`EquirayError` unless ``features`` fit this spec (and have ``channels`` channels)."""
        if len(features) != self.num_layers:
            raise EquirayError(f"features have {len(features)} layers, the spec {self.num_layers}; build both "
                               "from the same architecture (features_from_models returns a matching spec)")
        for i, (layer, w, b) in enumerate(zip(self.layers, features.weights, features.biases)):
            if tuple(w.shape[2:]) != layer.weight_shape or tuple(b.shape[2:]) != layer.bias_shape:
                raise EquirayError(f"layer {i}: expected weight (B, C, {layer.weight_shape}) and bias (B, C, "
                                   f"{layer.bias_shape}), got {tuple(w.shape)} and {tuple(b.shape)}")
            if channels is not None and (w.shape[1] != channels or b.shape[1] != channels):
                raise EquirayError(f"layer {i}: the metanetwork was built for {channels} feature channels, the "
                                   f"features have {w.shape[1]} (pass in_channels={w.shape[1]})")


@dataclasses.dataclass(frozen=True)
class WeightSpaceFeatures:
    """A batch of weight-space tensors: ``weights[i]`` (B, C, n_i, n_{i-1}, *kernel), ``biases[i]`` (B, C, n_i)."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]

    def __post_init__(self):
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))
        if len(self.weights) != len(self.biases) or not self.weights:
            raise EquirayError(f"need one bias per weight tensor, got {len(self.weights)} weights and "
                               f"{len(self.biases)} biases")
        batch = {t.shape[0] for t in self.weights + self.biases}
        if len(batch) != 1 or any(w.dim() < 4 for w in self.weights) or any(b.dim() != 3 for b in self.biases):
            raise EquirayError("weights must be (B, C, n_out, n_in[, kh, kw]) and biases (B, C, n_out) with one "
                               f"batch size; got {[tuple(w.shape) for w in self.weights]} and "
                               f"{[tuple(b.shape) for b in self.biases]}")

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.weights, self.biases))

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WeightSpaceFeatures:
        return WeightSpaceFeatures(tuple(fn(w) for w in self.weights), tuple(fn(b) for b in self.biases))

    def to(self, *args, **kwargs) -> WeightSpaceFeatures:
        return self.map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index) -> WeightSpaceFeatures:
        """The networks at ``index`` (an int, slice, index tensor or mask along the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self.map(lambda t: t[index])


# ----------------------------------------------------------------------------------------- the zoo and its weights
class ZooCNN(nn.Module):
    """The Small CNN Zoo architecture (Unterthiner et al. 2020): three 3x3 stride-2 convs with ``width`` channels,
    each followed by the activation (and dropout), global average pooling, one linear layer."""

    def __init__(self, *, activation: Literal["relu", "tanh"] = "relu", width: int = 16, in_chans: int = 1,
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise EquirayError(f"unknown zoo activation {activation!r}; choose one of {sorted(acts)}")
        layers: list[nn.Module] = []
        c = in_chans
        for _ in range(3):
            layers += [nn.Conv2d(c, width, 3, stride=2), acts[activation]()]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))  # (B, C, H, W) -> (B, C) -> (B, classes)


def zoo_cnn(*, activation: Literal["relu", "tanh"] = "relu", width: int = 16, in_chans: int = 1,
            num_classes: int = 10, dropout: float = 0.0) -> ZooCNN:
    """The reference zoo model: Conv(1->16, 3x3, stride 2) x3, act, GAP, Linear(16->10): 4,970 parameters."""
    return ZooCNN(activation=activation, width=width, in_chans=in_chans, num_classes=num_classes, dropout=dropout)


def _weight_layers(model: nn.Module) -> list[nn.Linear | nn.Conv2d]:
    """The Linear/Conv2d layers in registration order; any other module holding parameters is refused."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if module.bias is None:
                raise EquirayError(f"layer {name!r} has no bias; zoo networks need biases (bias=True)")
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise EquirayError(f"layer {name!r} is a grouped conv (groups={module.groups}); only groups=1 is "
                                   "supported")
            layers.append(module)
        elif any(True for _ in module.parameters(recurse=False)):
            raise EquirayError(f"module {name!r} ({type(module).__name__}) has parameters outside Linear/Conv2d; "
                               "the weight-space symmetry (S1, S2) only covers plain Linear/Conv2d stacks")
    if not layers:
        raise EquirayError(f"{type(model).__name__} has no Linear or Conv2d layers")
    return layers


def _spec_of(layers: Sequence[nn.Linear | nn.Conv2d]) -> NetworkSpec:
    specs = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            if specs and not specs[-1].kernel_size:
                raise EquirayError(f"layer {i} is a Conv2d after a Linear layer; supported are Conv2d layers, then "
                                   "global average pooling, then Linear layers")
            specs.append(LayerSpec(m.out_channels, m.in_channels, tuple(m.kernel_size)))
        else:
            specs.append(LayerSpec(m.out_features, m.in_features))
    return NetworkSpec(tuple(specs))


def features_from_models(models: Sequence[nn.Module]) -> tuple[WeightSpaceFeatures, NetworkSpec]:
    """Stack the weights of same-architecture MLPs / GAP-CNNs into features with one channel (detached copies).

    The hidden units of a CNN are the conv output channels; global average pooling passes their scale to the
    linear head unchanged, so (S1, S2) hold with kernel positions as extra fixed axes.
    """
    if not models:
        raise EquirayError("features_from_models needs at least one model")
    per_model = [_weight_layers(m) for m in models]
    spec = _spec_of(per_model[0])
    for idx, layers in enumerate(per_model[1:], start=1):
        if _spec_of(layers) != spec:
            raise EquirayError(f"model {idx} has layers {_spec_of(layers)}, model 0 {spec}: stack only models of "
                               "one architecture")
    weights = tuple(torch.stack([ls[i].weight.detach() for ls in per_model])[:, None] for i in range(len(spec.layers)))
    biases = tuple(torch.stack([ls[i].bias.detach() for ls in per_model])[:, None] for i in range(len(spec.layers)))
    return WeightSpaceFeatures(weights, biases), spec  # weights[i]: (B, 1, n_i, n_{i-1}, *k); biases[i]: (B, 1, n_i)


def features_from_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]]) -> tuple[WeightSpaceFeatures,
                                                                                       NetworkSpec]:
    """Like :func:`features_from_models` for state dicts: every 2-D/4-D ``*weight`` with its ``*bias``, in order."""
    if not state_dicts:
        raise EquirayError("features_from_state_dicts needs at least one state dict")
    per_sd = []
    for idx, sd in enumerate(state_dicts):
        pairs, used = [], set()
        for key, value in sd.items():
            if key.endswith("weight") and value.dim() in (2, 4):
                bias_key = key[: -len("weight")] + "bias"
                if bias_key not in sd:
                    raise EquirayError(f"state dict {idx}: {key!r} has no {bias_key!r}; zoo networks need biases")
                pairs.append((value, sd[bias_key]))
                used |= {key, bias_key}
        left = [k for k, v in sd.items() if k not in used and torch.is_floating_point(v)]
        if left:
            raise EquirayError(f"state dict {idx} has tensors outside Linear/Conv2d layers ({left[:5]}); the "
                               "weight-space symmetry only covers plain Linear/Conv2d stacks")
        per_sd.append([(w[None], b[None]) for w, b in pairs])
    return _stack_nets(per_sd)  # weights[i]: (B, 1, n_i, n_{i-1}, *k); biases[i]: (B, 1, n_i)


def _stack_nets(per_net: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[WeightSpaceFeatures, NetworkSpec]:
    """Per net, per layer ``(W (C, n_i, n_{i-1}, *k), b (C, n_i))`` -> batched features and their common spec."""
    spec = None
    for idx, layers in enumerate(per_net):
        this = NetworkSpec(tuple(LayerSpec(w.shape[1], w.shape[2], tuple(w.shape[3:])) for w, _ in layers))
        if spec is not None and this != spec:
            raise EquirayError(f"state dict {idx} has layers {this}, state dict 0 {spec}: use one architecture")
        spec = this
    weights = tuple(torch.stack([p[i][0] for p in per_net]).detach() for i in range(spec.num_layers))
    biases = tuple(torch.stack([p[i][1] for p in per_net]).detach() for i in range(spec.num_layers))
    return WeightSpaceFeatures(weights, biases), spec


def features_from_normalized_cnns(state_dicts: Sequence[dict[str, torch.Tensor]]) -> tuple[WeightSpaceFeatures,
                                                                                              NetworkSpec]:
    """Features of CNNs whose bias-free convs are each followed by a whole-layer normalisation with a per-channel
    affine (``GroupNorm(1, C)``: gamma, beta) and an odd activation, then GAP and a linear head: equiray's
    ``small_cnn`` ensemble member.

    Such a net keeps its function under hidden-channel permutations and under per-channel sign flips ``s`` that
    negate gamma_j and beta_j and the next layer's input channel j (tanh is odd); the conv rows themselves do not
    flip (the normalisation sees the whole layer). Two channels carry exactly the (S1, S2) sign-flip action, so
    the ``"sign"`` Monomial-NFN reads them: weights ``[sign(gamma) * W, gamma * W]`` and biases ``[beta, gamma]``
    (the head's weight and bias twice). Returns features with 2 channels and the spec."""
    if not state_dicts:
        raise EquirayError("features_from_normalized_cnns needs at least one state dict")
    per_sd = []
    for idx, sd in enumerate(state_dicts):
        items = [(k, v) for k, v in sd.items() if torch.is_floating_point(v)]
        layers, i = [], 0
        while i < len(items):
            key, w = items[i]
            if w.dim() == 4 and i + 2 < len(items) and items[i + 1][1].shape == items[i + 2][1].shape == w.shape[:1]:
                gamma, beta = items[i + 1][1], items[i + 2][1]
                sign = torch.where(gamma < 0, -1.0, 1.0).to(w.dtype)
                shape = (-1,) + (1,) * (w.dim() - 1)
                layers.append((torch.stack([sign.view(shape) * w, gamma.view(shape) * w]),
                               torch.stack([beta, gamma])))
                i += 3
            elif w.dim() == 2 and i + 1 < len(items) and items[i + 1][1].shape == w.shape[:1]:
                b = items[i + 1][1]
                layers.append((torch.stack([w, w]), torch.stack([b, b])))
                i += 2
            else:
                raise EquirayError(f"state dict {idx}: {key!r} {tuple(w.shape)} is neither a bias-free conv followed "
                                   "by a normalisation's (weight, bias) nor a linear layer with a bias")
        per_sd.append(layers)
    return _stack_nets(per_sd)  # weights[i]: (B, 2, n_i, n_{i-1}, *k); biases[i]: (B, 2, n_i)


def load_features_into(model: nn.Module, features: WeightSpaceFeatures, index: int, *, channel: int = 0) -> nn.Module:
    """Copy network ``index`` (feature channel ``channel``) of ``features`` into ``model`` in place; returns it."""
    layers = _weight_layers(model)
    _spec_of(layers).check(features)
    if not 0 <= index < features.batch_size:
        raise EquirayError(f"index {index} is outside the batch of {features.batch_size} networks")
    with torch.no_grad():
        for layer, (w, b) in zip(layers, features):
            layer.weight.copy_(w[index, channel])
            layer.bias.copy_(b[index, channel])
    return model


# ----------------------------------------------------------------------------------------- the symmetry group
def _permute_scale(x: torch.Tensor, dim: int, perm: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y[..., j, ...] = scale[j] * x[..., perm[j], ...]`` along ``dim``, per network (perm, scale: (B, n))."""
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = perm.shape[1]
    y = x.gather(dim, perm.to(x.device).view(shape).expand_as(x))
    return y * scale.to(x.device, x.dtype).view(shape)


@dataclasses.dataclass(frozen=True)
class WeightSymmetry:
    """A batch of elements of the hidden-unit monomial group: ``perms[i]`` (B, n_{i+1}) long, ``scales[i]``
    (B, n_{i+1}) for the hidden layers 1..L-1 in (S1, S2) order."""

    perms: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]

    def act_layer(self, index: int, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S1, S2) on layer ``index`` (0-based) of a feature batch: weight (B, C, n_i, n_{i-1}, ...), bias
        (B, C, n_i)."""
        if index < len(self.perms):
            weight = _permute_scale(weight, 2, self.perms[index], self.scales[index])
            bias = _permute_scale(bias, 2, self.perms[index], self.scales[index])
        if index > 0:
            weight = _permute_scale(weight, 3, self.perms[index - 1], 1.0 / self.scales[index - 1])
        return weight, bias

    def inverse(self) -> WeightSymmetry:
        """``g^-1 = (pi^-1, 1 / d[pi^-1])``."""
        inv = tuple(torch.argsort(p, dim=1) for p in self.perms)
        return WeightSymmetry(inv, tuple(1.0 / s.gather(1, q) for s, q in zip(self.scales, inv)))


def random_symmetry(spec: NetworkSpec, batch: int, *, group: Symmetry = "positive", max_scale: float = 1e4,
                    generator: torch.Generator | None = None, device: torch.device | str | None = None
                    ) -> WeightSymmetry:
    """Uniform permutations and, per hidden unit, ``d`` log-uniform in [1/max_scale, max_scale] (``"positive"``),
    uniform in {-1, +1} (``"sign"``) or 1 (``"permutation"``). Scales are float64."""
    if group not in SYMMETRIES:
        raise EquirayError(f"unknown symmetry {group!r}; choose one of {', '.join(SYMMETRIES)}")
    if max_scale < 1:
        raise EquirayError(f"max_scale bounds d to [1/max_scale, max_scale] and must be >= 1, got {max_scale}")
    perms, scales = [], []
    for n in spec.hidden_sizes:
        perms.append(torch.argsort(torch.rand(batch, n, generator=generator), dim=1).to(device))
        u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
        if group == "positive":
            s = torch.exp((2 * u - 1) * math.log(max_scale))
        elif group == "sign":
            s = torch.where(u < 0.5, -1.0, 1.0).double()
        else:
            s = torch.ones_like(u)
        scales.append(s.to(device))
    return WeightSymmetry(tuple(perms), tuple(scales))


def apply_symmetry(features: WeightSpaceFeatures, transform: WeightSymmetry) -> WeightSpaceFeatures:
    """``g . features`` by (S1, S2); every channel is transformed alike."""
    if len(transform.perms) != len(features) - 1:
        raise EquirayError(f"the transform has {len(transform.perms)} hidden layers, the features "
                           f"{len(features) - 1}; draw it with random_symmetry(spec, ...) for the same spec")
    out = [transform.act_layer(i, w, b) for i, (w, b) in enumerate(features)]
    return WeightSpaceFeatures(tuple(w for w, _ in out), tuple(b for _, b in out))


# ----------------------------------------------------------------------------------------- equivariant layers
def _fold(weight: torch.Tensor) -> torch.Tensor:
    """Kernel axes are fixed by the symmetry: fold them into channels, (B, C, n, m, *k) -> (B, C*K, n, m)."""
    if weight.dim() == 4:
        return weight
    b, _, n, m = weight.shape[:4]
    return weight.movedim((2, 3), (-2, -1)).reshape(b, -1, n, m)  # (B, C, *k, n, m) -> (B, C*K, n, m)


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class FirstLayerMap(nn.Module):
    """(E1, E2): layer 1, whose input axis k is fixed and whose rows j are permuted and scaled by d_1[j]."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, cb, n = in_channels * layer.spatial_size, in_channels, layer.in_features
        self.w_self = _uniform(out_channels, cw, fan_in=2 * cw + cb)
        self.w_mix = _uniform(out_channels, cw, fan_in=2 * cw + cb)
        self.mix = _uniform(n, n, fan_in=n)
        self.w_from_b = _uniform(out_channels, cb, fan_in=2 * cw + cb)
        self.pos_from_b = nn.Parameter(torch.ones(n))
        self.b_self = _uniform(out_channels, cb, fan_in=cw + cb)
        self.b_from_w = _uniform(out_channels, cw, fan_in=cw + cb)
        self.pos_to_b = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = _fold(weight)  # (B, C*K, n_1, n_0)
        w_out = (torch.einsum("oc,bcjk->bojk", self.w_self, w)
                 + torch.einsum("oc,kl,bcjl->bojk", self.w_mix, self.mix, w)
                 + torch.einsum("oc,k,bcj->bojk", self.w_from_b, self.pos_from_b, bias))  # (B, O, n_1, n_0)
        b_out = (torch.einsum("oc,bcj->boj", self.b_self, bias)
                 + torch.einsum("oc,k,bcjk->boj", self.b_from_w, self.pos_to_b, w))  # (B, O, n_1)
        return w_out, b_out


class HiddenLayerMap(nn.Module):
    """(E3): a hidden layer, both axes permuted and scaled: only entrywise channel mixing survives, no bias."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw = in_channels * layer.spatial_size
        self.w_self = _uniform(out_channels, cw, fan_in=cw)
        self.b_self = _uniform(out_channels, in_channels, fan_in=in_channels)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w_out = torch.einsum("oc,bcjk->bojk", self.w_self, _fold(weight))  # (B, O, n_i, n_{i-1})
        return w_out, torch.einsum("oc,bcj->boj", self.b_self, bias)  # (B, O, n_i)


class LastLayerMap(nn.Module):
    """(E4, E5): layer L, whose output axis j is fixed; its bias is invariant and gets the only free bias ``t``."""

    def __init__(self, layer: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, cb, n = in_channels * layer.spatial_size, in_channels, layer.out_features
        self.w_self = _uniform(out_channels, cw, fan_in=2 * cw)
        self.w_mix = _uniform(out_channels, cw, fan_in=2 * cw)
        self.mix = _uniform(n, n, fan_in=n)
        self.b_self = _uniform(out_channels, cb, fan_in=2 * cb)
        self.b_mix = _uniform(out_channels, cb, fan_in=2 * cb)
        self.bias_mix = _uniform(n, n, fan_in=n)
        self.free_bias = nn.Parameter(torch.zeros(out_channels, n))

    def forward(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = _fold(weight)  # (B, C*K, n_L, n_{L-1})
        w_out = (torch.einsum("oc,bcjk->bojk", self.w_self, w)
                 + torch.einsum("oc,ji,bcik->bojk", self.w_mix, self.mix, w))  # (B, O, n_L, n_{L-1})
        b_out = (torch.einsum("oc,bcj->boj", self.b_self, bias)
                 + torch.einsum("oc,ji,bci->boj", self.b_mix, self.bias_mix, bias) + self.free_bias)  # (B, O, n_L)
        return w_out, b_out


class SignCoupling(nn.Module):
    """(E6): under sign flips ``W_L[:, k]`` and ``b_{L-1}[k]`` both change by ``d_{L-1}[k]``, so they may mix."""

    def __init__(self, last: LayerSpec, in_channels: int, out_channels: int):
        super().__init__()
        cw, n = in_channels * last.spatial_size, last.out_features
        self.q = _uniform(out_channels, in_channels, fan_in=in_channels)
        self.q_pos = nn.Parameter(torch.ones(n))
        self.r = _uniform(out_channels, cw, fan_in=cw)
        self.r_pos = nn.Parameter(torch.full((n,), 1.0 / n))

    def forward(self, last_weight: torch.Tensor, prev_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the additions to (W'_L, b'_{L-1})."""
        dw = torch.einsum("oc,j,bck->bojk", self.q, self.q_pos, prev_bias)  # (B, O, n_L, n_{L-1})
        db = torch.einsum("oc,j,bcjk->bok", self.r, self.r_pos, _fold(last_weight))  # (B, O, n_{L-1})
        return dw, db


class MonomialLinear(nn.Module):
    """The equivariant linear layer (E1-E5, plus E6 for ``group="sign"``), features -> features.

    Input features may have kernel axes (``spec``); the output has none (they are folded into channels), so its
    spec is ``spec.without_spatial()`` (:attr:`out_spec`).
    """

    def __init__(self, spec: NetworkSpec, in_channels: int, out_channels: int, *, group: ScalingGroup = "positive"):
        super().__init__()
        if spec.num_layers < 2:
            raise EquirayError("Monomial-NFN layers need networks with at least 2 layers (1 hidden layer); a "
                               "single layer has no hidden-unit symmetry")
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        self.spec, self.group, self.in_channels = spec, group, in_channels
        last = spec.num_layers - 1
        self.maps = nn.ModuleList(
            (FirstLayerMap if i == 0 else LastLayerMap if i == last else HiddenLayerMap)(layer, in_channels,
                                                                                          out_channels)
            for i, layer in enumerate(spec.layers))
        self.coupling = SignCoupling(spec.layers[-1], in_channels, out_channels) if group == "sign" else None

    @property
    def out_spec(self) -> NetworkSpec:
        return self.spec.without_spatial()

    def forward(self, features: WeightSpaceFeatures) -> WeightSpaceFeatures:
        self.spec.check(features, channels=self.in_channels)
        out = [m(w, b) for m, (w, b) in zip(self.maps, features)]
        weights, biases = [w for w, _ in out], [b for _, b in out]
        if self.coupling is not None:
            dw, db = self.coupling(features.weights[-1], features.biases[-2])
            weights[-1], biases[-2] = weights[-1] + dw, biases[-2] + db
        return WeightSpaceFeatures(tuple(weights), tuple(biases))


class FeatureActivation(nn.Module):
    """An entrywise nonlinearity on every tensor: ReLU for positive scalings, an odd function for sign flips."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, features: WeightSpaceFeatures) -> WeightSpaceFeatures:
        return features.map(self.fn)


# ----------------------------------------------------------------------------------------- invariant layer
class MonomialInvariantPool(nn.Module):
    """Entry-wise scale removal, then the mean over permuted axes: features -> (B, out_dim).

    ``"positive"``: ``gamma * v / ||v|| + beta`` per entry's channel vector ``v`` (degree-0 homogeneous, so
    invariant to ``v -> d v``, d > 0); ``"sign"``: ``|P v| + beta`` (even, so invariant to ``v -> -v``). Kept axes:
    the input axis of W_1, the output axis of W_L and b_L.
    """

    def __init__(self, spec: NetworkSpec, channels: int, *, group: ScalingGroup = "positive"):
        super().__init__()
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        if any(layer.kernel_size for layer in spec.layers):
            raise EquirayError("pool features without kernel axes (the output of a MonomialLinear layer)")
        self.spec, self.group, self.channels = spec, group, channels
        n = 2 * spec.num_layers
        if group == "positive":
            self.gamma = nn.Parameter(torch.ones(n, channels))
        else:
            self.proj = nn.Parameter(torch.eye(channels).repeat(n, 1, 1) + 0.1 * torch.randn(n, channels, channels))
        self.beta = nn.Parameter(torch.zeros(n, channels))

    @property
    def out_dim(self) -> int:
        n_in, n_out, num = self.spec.layers[0].in_features, self.spec.layers[-1].out_features, self.spec.num_layers
        # W_1 keeps n_0, hidden W_i (L-2) and b_1..b_{L-1} pool to C each, W_L and b_L keep n_L
        return self.channels * (n_in + (num - 2) + (num - 1) + 2 * n_out)

    def _entrywise(self, x: torch.Tensor, t: int) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        if self.group == "positive":
            tiny = torch.finfo(x.dtype).tiny ** 0.5  # a norm below this counts as zero (exact invariance above it)
            u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(tiny)
            return self.gamma[t].view(view) * u + self.beta[t].view(view)
        return torch.einsum("oc,bc...->bo...", self.proj[t], x).abs() + self.beta[t].view(view)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        self.spec.check(features, channels=self.channels)
        last, pooled = len(features) - 1, []
        for i, (w, b) in enumerate(features):
            w, b = self._entrywise(w, 2 * i), self._entrywise(b, 2 * i + 1)
            dims = tuple(a + 2 for a in self.spec.permuted_axes(i))
            pooled.append(w.mean(dim=dims).flatten(1))  # (B, C[, n_0 | n_L])
            pooled.append((b if i == last else b.mean(dim=2)).flatten(1))  # (B, C[, n_L])
        return torch.cat(pooled, dim=1)  # (B, out_dim)


PATH_NORM_POWERS: tuple[float, ...] = (1.0, 2.0)


def path_norms(features: WeightSpaceFeatures, powers: Sequence[float] = PATH_NORM_POWERS) -> torch.Tensor:
    """Invariant path statistics: exact invariants of hidden-unit permutations, positive scalings and sign flips.

    With ``A_i = sum_kernel |W_i|^p``: forward ``v_0 = 1``, ``v_i = A_i v_{i-1} + |b_i|^p``; backward ``u_L = 1``,
    ``u_{i-1} = A_i^T u_i``. Under (S1, S2) ``v_i[j]`` picks up ``|d_i[j]|^p`` and ``u_i[j]`` its inverse, both
    permuted with layer i, so the l_p path norms ``v_L`` and the flow ``v_i * u_i`` through each hidden unit are
    unchanged up to that permutation. Returned per power and feature channel: ``log v_L / p`` (n_L values) and,
    per hidden layer, the mean, standard deviation, min and max over its units of ``log(v_i u_i) / p``:
    ``(B, C * len(powers) * (n_L + 4 (L - 1)))``.

    They keep what the entry-wise normalisation of :class:`MonomialInvariantPool` removes together with the
    symmetric part: the overall scale of a net's function and how it spreads over units (a net that barely
    trained has small path norms). Products along paths are also the coupling of consecutive layers that the
    equivariant layers themselves do not have.
    """
    tiny = torch.finfo(features.dtype).tiny
    out = []
    for p in powers:
        mats = []
        for w in features.weights:
            a = w.abs().pow(p)
            mats.append(a.flatten(4).sum(-1) if a.dim() > 4 else a)  # (B, C, n_i, n_{i-1})
        v = torch.ones(*mats[0].shape[:2], mats[0].shape[3], dtype=features.dtype, device=features.device)
        forward = []
        for a, b in zip(mats, features.biases):
            v = torch.einsum("bcjk,bck->bcj", a, v) + b.abs().pow(p)  # (B, C, n_i)
            forward.append(v)
        u = torch.ones_like(forward[-1])
        stats = [torch.log(forward[-1].clamp_min(tiny)) / p]  # (B, C, n_L)
        for i in range(len(mats) - 1, 0, -1):
            u = torch.einsum("bcjk,bcj->bck", mats[i], u)  # (B, C, n_{i-1}): paths from each unit to the outputs
            flow = torch.log((forward[i - 1] * u).clamp_min(tiny)) / p
            stats.append(torch.stack([flow.mean(-1), flow.std(-1), flow.amin(-1), flow.amax(-1)], -1))
        out.append(torch.cat(stats, dim=-1).flatten(1))
    return torch.cat(out, dim=1)


def path_norm_dim(spec: NetworkSpec, channels: int, powers: Sequence[float] = PATH_NORM_POWERS) -> int:
    """The width of :func:`path_norms`' output for features fitting ``spec`` with ``channels`` channels."""
    return channels * len(powers) * (spec.layers[-1].out_features + 4 * (spec.num_layers - 1))


# ----------------------------------------------------------------------------------------- metanetworks
def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class MonomialNFN(nn.Module):
    """Invariant Monomial-NFN: ``num_layers`` x (MonomialLinear, ReLU|tanh), the invariant pool, an MLP head.

    ``group="positive"`` for ReLU zoos (invariant to hidden-unit permutations and positive scalings),
    ``"sign"`` for tanh zoos (permutations and sign flips). Input: :class:`WeightSpaceFeatures` fitting ``spec``
    with ``in_channels`` channels. Output (B, out_dim), e.g. predicted test accuracy.
    """

    def __init__(self, spec: NetworkSpec, *, group: ScalingGroup = "positive", in_channels: int = 1,
                 hidden_channels: int = 16, num_layers: int = 2, mlp_hidden: Sequence[int] = (32, 32),
                 out_dim: int = 1, path_norms: bool = False):
        super().__init__()
        if group not in SCALING_GROUPS:
            raise EquirayError(f"unknown group {group!r}; choose 'positive' (ReLU nets) or 'sign' (tanh nets)")
        if num_layers < 1 or hidden_channels < 1:
            raise EquirayError(f"need num_layers >= 1 and hidden_channels >= 1, got {num_layers}, {hidden_channels}")
        self.spec, self.group, self.in_channels = spec, group, in_channels
        act = torch.relu if group == "positive" else torch.tanh
        layers: list[nn.Module] = []
        s, c = spec, in_channels
        for _ in range(num_layers):
            layer = MonomialLinear(s, c, hidden_channels, group=group)
            layers += [layer, FeatureActivation(act)]
            s, c = layer.out_spec, hidden_channels
        self.equivariant = nn.Sequential(*layers)
        self.pool = MonomialInvariantPool(s, hidden_channels, group=group)
        self.path_norms = bool(path_norms)
        extra = path_norm_dim(spec, in_channels) if self.path_norms else 0
        self.head = _mlp(self.pool.out_dim + extra, mlp_hidden, out_dim)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        pooled = self.pool(self.equivariant(features))  # (B, pool.out_dim)
        if self.path_norms:
            pooled = torch.cat([pooled, path_norms(features)], dim=1)
        return self.head(pooled)  # (B, out_dim)


class StatNN(nn.Module):
    """STATNN baseline (Unterthiner et al. 2020): mean, variance and the 0/25/50/75/100% quantiles of every
    ``W_i`` and ``b_i`` -> MLP. Invariant to permutations, not to scalings."""

    QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __init__(self, spec: NetworkSpec, *, in_channels: int = 1, mlp_hidden: Sequence[int] = (64, 64),
                 out_dim: int = 1):
        super().__init__()
        self.spec, self.in_channels = spec, in_channels
        self.head = _mlp(2 * spec.num_layers * (2 + len(self.QUANTILES)), mlp_hidden, out_dim)

    @classmethod
    def statistics(cls, features: WeightSpaceFeatures) -> torch.Tensor:
        stats = []
        for t in features.weights + features.biases:
            flat = t.flatten(1)  # (B, C * prod(shape))
            q = torch.tensor(cls.QUANTILES, dtype=flat.dtype, device=flat.device)
            stats += [flat.mean(1, keepdim=True), flat.var(1, keepdim=True), torch.quantile(flat, q, dim=1).T]
        return torch.cat(stats, dim=1)  # (B, 2L * 7)

    def forward(self, features: WeightSpaceFeatures) -> torch.Tensor:
        self.spec.check(features, channels=self.in_channels)
        return self.head(self.statistics(features))


# ----------------------------------------------------------------------------------------- registry
_METANETWORKS: dict[str, Callable[..., nn.Module]] = {}


def register_metanetwork(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(spec, **kwargs) -> nn.Module`` (features -> (B, out_dim)) under ``name``."""
    _METANETWORKS[name] = factory


register_metanetwork("monomial-nfn", MonomialNFN)
register_metanetwork("statnn", StatNN)


def list_metanetworks() -> list[str]:
    return sorted(_METANETWORKS)


def create_metanetwork(name: str, spec: NetworkSpec, **kwargs) -> nn.Module:
    if name not in _METANETWORKS:
        raise EquirayError(f"unknown metanetwork {name!r}; choose one of {', '.join(list_metanetworks())}")
    try:
        return _METANETWORKS[name](spec, **kwargs)
    except TypeError as exc:
        raise EquirayError(f"metanetwork {name!r} does not take these options {sorted(kwargs)}: {exc}") from None


# ----------------------------------------------------------------------------------------- fitting a metanetwork
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def kendall_tau(pred: torch.Tensor | Sequence[float], target: torch.Tensor | Sequence[float]) -> float:
    """Kendall's tau-b between predicted and true values (the zoo literature's score for accuracy prediction)."""
    from scipy.stats import kendalltau

    pred, target = torch.as_tensor(pred).double().flatten(), torch.as_tensor(target).double().flatten()
    if pred.numel() != target.numel() or pred.numel() < 2:
        raise EquirayError(f"kendall_tau needs two equally long series of >= 2 values, got {pred.numel()} and "
                           f"{target.numel()}")
    tau = kendalltau(pred.numpy(), target.numpy()).statistic
    return float(tau) if math.isfinite(tau) else 0.0  # constant predictions rank nothing


@torch.no_grad()
def predict(model: nn.Module, features: WeightSpaceFeatures, *, batch_size: int = 256) -> torch.Tensor:
    """``model`` on every network of ``features`` in eval mode, in batches: (B,) for a one-output metanetwork."""
    model.eval()
    out = [model(features[i:i + batch_size]) for i in range(0, features.batch_size, batch_size)]
    return torch.cat(out).squeeze(-1)


@dataclasses.dataclass
class MetaFit:
    """What :func:`fit_metanetwork` returns: the per-epoch history, the chosen epoch, and the target scaling
    (predictions in target units are ``model(features) * std + mean``)."""

    history: list[dict]
    best_epoch: int
    mean: float
    std: float
    seconds: float


def fit_metanetwork(model: nn.Module, features: WeightSpaceFeatures, targets: torch.Tensor, *,
                    train_idx: torch.Tensor, val_idx: torch.Tensor, epochs: int = 100, batch_size: int = 16,
                    lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                    on_epoch: Callable[[dict], None] | None = None) -> MetaFit:
    """Regress ``targets`` (e.g. test accuracy, one per network) from weights with MSE on standardised targets,
    Adam, ``epochs`` passes over ``train_idx``; the weights of the epoch with the best validation Kendall tau are
    kept (the model is left holding them). ``on_epoch`` sees each epoch's record."""
    import copy
    import time

    if len(train_idx) < 2 or len(val_idx) < 2:
        raise EquirayError(f"need >= 2 training and >= 2 validation networks, got {len(train_idx)} and {len(val_idx)}")
    targets = torch.as_tensor(targets, dtype=features.dtype, device=features.device).flatten()
    mean, std = float(targets[train_idx].mean()), float(targets[train_idx].std().clamp_min(1e-8))
    z = (targets - mean) / std
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state, best_epoch = [], -float("inf"), None, 0
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in train_idx[torch.randperm(len(train_idx), generator=gen)].split(batch_size):
            loss = nn.functional.mse_loss(model(features[idx.to(features.device)]).squeeze(-1), z[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_tau = kendall_tau(predict(model, features[val_idx]), targets[val_idx])
        record = {"epoch": epoch, "train_loss": total / len(train_idx), "val_tau": val_tau}
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if val_tau > best:
            best, best_epoch, best_state = val_tau, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return MetaFit(history, best_epoch, mean, std, time.perf_counter() - t0)
