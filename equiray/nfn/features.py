"""Weights in, weights out: same-architecture networks (modules or state dicts) stacked into
:class:`~equiray.nfn.spec.WeightSpaceFeatures`, and one network of a batch copied back into a module."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from equiray.errors import EquirayError
from equiray.nfn.spec import LayerSpec, NetworkSpec, WeightSpaceFeatures


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
