"""The weight space's data types: a zoo network's layer shapes (:class:`NetworkSpec`) and a batch of networks'
weights as metanetwork features (:class:`WeightSpaceFeatures`), with the symmetry groups they are read under."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Literal

import torch

from equiray.errors import EquirayError

ScalingGroup = Literal["positive", "sign"]
Symmetry = Literal["positive", "sign", "permutation"]
SCALING_GROUPS: tuple[str, ...] = ("positive", "sign")
SYMMETRIES: tuple[str, ...] = ("positive", "sign", "permutation")

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
