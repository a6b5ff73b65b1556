"""The stacked ensemble: ``N`` members of one architecture as one module, evaluated in one vectorized call.

:class:`StackedEnsemble` holds the members' parameters stacked along a leading member axis and evaluates all
of them at once (``torch.func.functional_call`` under ``torch.vmap``, or grouped convolutions for
:class:`~equiray.models.small.SmallCNN` members). Training with a per-member loss summed over members gives every
member exactly the gradient it would get alone, so one optimizer over the stacked tensors is N independent
optimizers (SGD, Adam: all elementwise).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from equiray.errors import EquirayError
from equiray.models import create_model, freeze_batchnorm, register_model
from equiray.models.small import fast_tanh

__all__ = ["MemberSpec", "StackedEnsemble"]


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """What every member of an ensemble is: an equiray/timm model name and its keyword arguments; ``frozen_bn``:
    its BatchNorm layers folded into trainable affine maps (:func:`~equiray.models.freeze_batchnorm`), so a network
    with BatchNorm (e.g. a pretrained resnet8) can be a member."""

    name: str = "small_cnn"
    kwargs: dict = dataclasses.field(default_factory=dict)
    in_chans: int = 1
    num_classes: int = 10
    frozen_bn: bool = False

    def build(self) -> nn.Module:
        model = create_model(self.name, in_chans=self.in_chans, num_classes=self.num_classes, **self.kwargs)
        return freeze_batchnorm(model) if self.frozen_bn else model


def _key(name: str) -> str:
    return name.replace(".", "__")


class StackedEnsemble(nn.Module):
    """``N`` members of one architecture with stacked parameters; ``forward`` is the ensemble mean of logits.

    ``member_logits(x)`` gives every member's output: ``x`` of shape ``(B, C, H, W)`` is shared by all members,
    ``(N, B, C, H, W)`` gives each member its own batch. Output ``(N, B, K)``.
    """

    def __init__(self, spec: MemberSpec, num_members: int, *, members: Sequence[nn.Module] | None = None):
        super().__init__()
        if num_members < 1:
            raise EquirayError(f"an ensemble needs at least one member, got {num_members}")
        self.spec = spec
        self.num_members = num_members
        members = list(members) if members is not None else [spec.build() for _ in range(num_members)]
        if len(members) != num_members:
            raise EquirayError(f"got {len(members)} member modules for num_members={num_members}")
        for m in members:
            if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
                raise EquirayError(f"{spec.name} uses BatchNorm, whose running statistics cannot be stacked; fold "
                                   "it into affine maps (MemberSpec(frozen_bn=True), member.frozen_bn in a config) "
                                   "or use a member with GroupNorm/LayerNorm (e.g. small_cnn)")
        params, buffers = stack_module_state(members)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        for name, value in params.items():
            self.register_parameter(_key(name), nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            self.register_buffer(_key(name), value.detach().clone())
        base = copy.deepcopy(members[0]).to("meta")
        object.__setattr__(self, "_base", base)  # not a submodule: its (meta) parameters are never used

    def stacked_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(parameters, buffers)`` by the member model's own (dotted) names, each stacked ``(N, ...)``: the live
        tensors, so gradients flow through them (member ``m``'s own state dict is ``{n: t[m] for ...}``)."""
        params = {n: getattr(self, _key(n)) for n in self._param_names}
        buffers = {n: getattr(self, _key(n)) for n in self._buffer_names}
        return params, buffers

    def member_logits(self, x: torch.Tensor, *, vectorize: Literal["auto", "vmap"] = "auto") -> torch.Tensor:
        per_member = x.dim() == 5
        if per_member and x.shape[0] != self.num_members:
            raise EquirayError(f"per-member input needs {self.num_members} batches, got {x.shape[0]}")
        params, buffers = self.stacked_state()
        if vectorize == "auto" and self.spec.name == "small_cnn":
            return _small_cnn_grouped(params, buffers, x, self.num_members)

        def one(p, b, inp):
            return functional_call(self._base, (p, b), (inp,))

        return torch.vmap(one, in_dims=(0, 0, 0 if per_member else None), randomness="different")(
            params, buffers, x)  # (N, B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)  # (B, K)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "StackedEnsemble":
        """A new ensemble of the chosen members (copies of their parameters)."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = StackedEnsemble.__new__(StackedEnsemble)
        nn.Module.__init__(out)
        out.spec, out.num_members = self.spec, len(index)
        out._param_names, out._buffer_names = list(self._param_names), list(self._buffer_names)
        for n in self._param_names:
            out.register_parameter(_key(n), nn.Parameter(getattr(self, _key(n)).detach()[index].clone()))
        for n in self._buffer_names:
            out.register_buffer(_key(n), getattr(self, _key(n))[index].clone())
        object.__setattr__(out, "_base", self._base)
        return out

    @staticmethod
    def concat(parts: Sequence["StackedEnsemble"]) -> "StackedEnsemble":
        """Join member groups (same spec) into one ensemble, in the given order."""
        if not parts:
            raise EquirayError("no member groups to join")
        first = parts[0]
        out = first.subset(range(first.num_members))
        out.num_members = sum(p.num_members for p in parts)
        for n in first._param_names:
            out.register_parameter(_key(n), nn.Parameter(torch.cat([getattr(p, _key(n)).detach() for p in parts])))
        for n in first._buffer_names:
            out.register_buffer(_key(n), torch.cat([getattr(p, _key(n)) for p in parts]))
        return out


# Members per grouped call are chosen so that one layer's activations stay around this many elements (a few MB,
# cache-sized): on CPU, 4 members at 28x28 or 16 at 14x14 (batch 32, width 16) run 1.5x faster than 16 at 28x28.
CHUNK_ELEMENTS = 1_600_000


def _small_cnn_grouped(params: dict, buffers: dict, x: torch.Tensor, n: int, *,
                       chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """All members of a :class:`~equiray.models.small.SmallCNN` ensemble as grouped convolutions in
    channels-last layout: the same function as ``vmap(functional_call)``, about 3.5x faster on CPU (vmap's
    grouped convolution runs in NCHW there). On CPU, large groups run in cache-sized chunks of members; on a GPU
    the whole group is one launch per layer."""
    width = params["features.0.weight"].shape[1]
    per_member = x.shape[-4] * width * x.shape[-2] * x.shape[-1]  # one layer's activations for one member
    chunk = max(1, chunk_elements // max(per_member, 1)) if x.device.type == "cpu" else n  # GPUs want it whole
    if chunk < n:
        outs = []
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            xs = x[sl] if x.dim() == 5 else x
            outs.append(_small_cnn_grouped({k: v[sl] for k, v in params.items()},
                                           {k: v[sl] for k, v in buffers.items()}, xs, sl.stop - sl.start,
                                           chunk_elements=10**18))
        return torch.cat(outs)  # (N, B, K)
    if x.dim() == 4:
        x = x.unsqueeze(0).expand(n, *x.shape)  # (N, B, C, H, W)
    b = x.shape[1]
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[-2:])  # (B, N*C, H, W), member-major channels
    h = h.contiguous(memory_format=torch.channels_last)
    layer = 0
    while f"features.{layer}.weight" in params:
        w = params[f"features.{layer}.weight"] * buffers[f"features.{layer}.mask"][:, None, None]  # (N, O, C, 3, 3)
        h = F.conv2d(h, w.flatten(0, 1), padding=1, groups=n)  # (B, N*O, H, W)
        h = F.group_norm(h, n, params[f"features.{layer + 1}.weight"].flatten(),
                         params[f"features.{layer + 1}.bias"].flatten(), eps=1e-5)  # LayerNorm per member
        h = fast_tanh(h)
        layer += 3
    feats = h.mean(dim=(-2, -1)).view(b, n, -1).transpose(0, 1)  # (N, B, O)
    head_w, head_b = params["head.weight"], params["head.bias"]  # (N, K, O), (N, K)
    return torch.baddbmm(head_b[:, None, :], feats, head_w.transpose(1, 2))  # (N, B, K)


@register_model
def ensemble(*, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False, member: str = "small_cnn",
             member_kwargs: dict | None = None, num_members: int = 1, member_frozen_bn: bool = False) -> nn.Module:
    """An augmentation ensemble as one model (its weights come from ``equiray ensemble train``)."""
    if pretrained:
        raise EquirayError("an ensemble has no hub weights; load it from the registry (models:/equiray-ensemble@champion)")
    return StackedEnsemble(MemberSpec(member, dict(member_kwargs or {}), in_chans, num_classes, member_frozen_bn),
                           num_members)
