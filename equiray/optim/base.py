"""The base class of the robust fine-tuning optimizers: parameter parsing (named pairs with ``exclude`` patterns,
groups with a ``"constrained"`` flag, or bare tensors), hyperparameter validation, anchors, and the AdamW/SGD
base update every method starts its step with.

Every method is a :class:`torch.optim.Optimizer` that implements its base update (AdamW with decoupled weight
decay, or SGD with optional momentum/Nesterov, numerically the same recipe as ``torch.optim.AdamW`` /
``torch.optim.SGD``) itself, so that *all* state -- base-optimizer moments, pretrained anchors, radii, the
radii's own Adam moments, FTP's previous direction -- lives in ``optimizer.state[param]``: ``state_dict()`` /
``load_state_dict()`` resume bit-identically, and ``param_groups`` hold only hyperparameters (floats, bools,
strings, parameter names), never tensors.

*Names.* Pass ``model.named_parameters()`` (pairs) to use ``exclude=`` patterns (``fnmatch``, e.g.
``("head.*", "fc.*")``): excluded tensors -- the newly initialized head -- get the plain base update and no
anchor/radius state. Alternatively pass parameter groups (dicts) with a ``"constrained": bool`` flag (missing
means ``True``), or bare tensors (all constrained).
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import math
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

from equiray.errors import ConfigError
from equiray.optim.kernels import (BASES, _foreach_adamw, _foreach_sgd, _fused_adamw, _fused_sgd,
                                   _split_by_device_dtype)

log = logging.getLogger(__name__)


def _few(names: Sequence[str], k: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:k])
    return f"{shown}{', ...' if len(names) > k else ''} ({len(names)} in all)"


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _split_named(named: Sequence[tuple[str, torch.Tensor]], exclude: Sequence[str], *, method: str
                 ) -> list[dict[str, Any]]:
    """Two parameter groups from ``(name, tensor)`` pairs: constrained (not matching ``exclude``) and excluded.

    Raises ``ConfigError`` when a pattern matches nothing (most often a typo or another model's head name)."""
    names = [n for n, _ in named]
    unmatched = [pat for pat in exclude if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        raise ConfigError(f"{method}: exclude pattern(s) {unmatched} match no parameter name; parameter names "
                          f"are e.g. {_few(names)}. Patterns are fnmatch-style and match whole names, "
                          f"e.g. 'head.*' for 'head.weight' and 'head.bias'.")
    kept = [(n, p) for n, p in named if not _match(n, exclude)]
    dropped = [(n, p) for n, p in named if _match(n, exclude)]
    groups = []
    if kept:
        groups.append({"params": kept, "constrained": True})
    if dropped:
        groups.append({"params": dropped, "constrained": False})
    log.debug("%s: constraining %d tensors, excluding %s", method, len(kept), [n for n, _ in dropped])
    return groups


def _is_named_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and isinstance(x[1], torch.Tensor)


class RobustOptimizer(torch.optim.Optimizer):
    """Shared machinery: parameter parsing, hyperparameter validation, the AdamW/SGD base update, anchors.

    Subclasses set ``method`` (its name in :func:`~equiray.optim.make_optimizer`) and ``_constrains`` (whether
    constrained tensors get an anchor, and whether "nothing left to constrain" is an error), and extend ``step``.
    A subclass's own hyperparameters are the keywords its constructor adds to this one's (they are kept per
    parameter group), less those named in ``loop_options``: keywords that wire it to a training loop
    (TPGM's held-out batches) rather than tune it. :func:`~equiray.optim.method_knobs` reads them from there.
    """

    method = "base"
    _constrains = False
    loop_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params, *, base: str, lr: float, weight_decay: float, betas: tuple[float, float],
                 eps: float, momentum: float, dampening: float, nesterov: bool, exclude: Sequence[str],
                 extra: dict[str, Any]):
        if isinstance(exclude, str):
            exclude = (exclude,)
        exclude = tuple(exclude)
        if isinstance(params, torch.Tensor):
            raise ConfigError(f"{self.method}: params must be an iterable (e.g. model.named_parameters()), "
                              "not a single tensor")
        items = list(params)
        if not items:
            raise ConfigError(f"{self.method}: got an empty parameter list")
        if all(isinstance(x, dict) for x in items):
            if exclude:
                raise ConfigError(f"{self.method}: exclude= works with (name, parameter) pairs; with parameter "
                                  "groups, put the excluded tensors in a group with 'constrained': False")
            groups = [dict(g) for g in items]
        elif all(_is_named_pair(x) for x in items):
            groups = _split_named(items, exclude, method=self.method)
        elif all(isinstance(x, torch.Tensor) for x in items):
            if exclude:
                raise ConfigError(f"{self.method}: exclude= needs parameter names; pass model.named_parameters() "
                                  "instead of model.parameters()")
            groups = [{"params": items}]
        else:
            raise ConfigError(f"{self.method}: params must be all (name, tensor) pairs, all tensors or all "
                              f"parameter-group dicts; got a mix ({sorted({type(x).__name__ for x in items})})")
        defaults = dict(base=base, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        momentum=momentum, dampening=dampening, nesterov=nesterov, constrained=True, **extra)
        super().__init__(groups, defaults)
        if self._constrains and not any(g["constrained"] and g["params"] for g in self.param_groups):
            raise ConfigError(f"{self.method}: no parameter is left to constrain (exclude={list(exclude)} or "
                              "'constrained': False took them all); use narrower exclude patterns, or "
                              "make_optimizer('finetune', ...) for unconstrained fine-tuning")

    # -- groups and state ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` plus validation; constrained tensors get their anchor
        (a copy of their current value) and the method's initial state here, i.e. when the optimizer is built.
        ``(name, tensor)`` pairs become tensors plus a ``"param_names"`` list (as torch >= 2.6 does itself)."""
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        if params is not None and not isinstance(params, (set, frozenset)):
            params = list(params)
            if params and all(_is_named_pair(x) for x in params):
                param_group.setdefault("param_names", [n for n, _ in params])
                params = [p for _, p in params]
            param_group["params"] = params
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if self._constrains and group["constrained"]:
            for p in group["params"]:
                state = self.state[p]
                state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
                self._init_constrained_state(p, state, group)

    def _init_constrained_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """Hook: per-tensor state beyond the anchor, created with the optimizer."""

    def _validate_group(self, g: dict[str, Any]) -> None:
        m = self.method
        if g["base"] not in BASES:
            raise ConfigError(f"{m}: base must be one of {list(BASES)}, got {g['base']!r}")
        if not isinstance(g["constrained"], bool):
            raise ConfigError(f"{m}: a parameter group's 'constrained' must be True or False, "
                              f"got {g['constrained']!r}")
        for key in ("lr", "weight_decay", "eps", "momentum", "dampening"):
            if not (isinstance(g[key], (int, float)) and g[key] >= 0 and math.isfinite(g[key])):
                raise ConfigError(f"{m}: {key} must be a finite number >= 0, got {g[key]!r}")
        b = g["betas"]
        if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
            raise ConfigError(f"{m}: betas must be two numbers in [0, 1), got {b!r}")
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ConfigError(f"{m}: nesterov=True needs momentum > 0 and dampening = 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for g in self.param_groups:
            g.setdefault("constrained", True)
            g.setdefault("nesterov", False)
            g.setdefault("dampening", 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict`` on a deep copy, so that loading the live ``state_dict()``
        of another optimizer never shares (and later mutates) its tensors. Replaces all state, anchors
        included: the anchors of the checkpoint win over the ones taken when this optimizer was built."""
        super().load_state_dict(copy.deepcopy(state_dict))

    # -- the base update -------------------------------------------------------------------------------

    @staticmethod
    def _base_update(params: list[torch.Tensor], grads: list[torch.Tensor], group: dict, states: list[dict]
                     ) -> None:
        """In place, for all tensors of one group at once: one AdamW step (Loshchilov & Hutter 2019,
        Algorithm 2; decoupled weight decay) or one SGD step (coupled L2 weight decay, momentum with dampening,
        optional Nesterov) -- the recipes of ``torch.optim.AdamW`` / ``torch.optim.SGD``. Leaves the gradients
        untouched. This is FTP's "UGD" step.

        Tensors on CPU/CUDA in a floating dtype go through PyTorch's fused kernels (``torch._fused_adamw_`` /
        ``torch._fused_sgd_``, what ``torch.optim.AdamW(fused=True)`` / ``SGD(fused=True)`` run: one pass over
        each tensor); others through ``torch._foreach_*`` ops (the ``foreach=True`` recipe). Both agree with
        the single-tensor recipe up to rounding; step counts stay Python ints in the state (no host sync)."""
        for g in grads:
            if g.is_sparse:
                raise RuntimeError("sparse gradients are not supported; use dense embeddings")
        for st in states:
            st["step"] = st.get("step", 0) + 1
        adamw = group["base"] == "adamw"
        if adamw:
            for p, st in zip(params, states):
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for idx, fused in _split_by_device_dtype(params, grads):
            ps = [params[i] for i in idx]
            gs = [grads[i] for i in idx]
            sts = [states[i] for i in idx]
            if adamw:
                (_fused_adamw if fused else _foreach_adamw)(ps, gs, sts, group)
            else:
                (_fused_sgd if fused else _foreach_sgd)(ps, gs, sts, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step on every tensor that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            self._before_base_update(params, grads, group, states)
            self._base_update(params, grads, group, states)
            self._after_base_update(params, grads, group, states)
        self._after_step()
        return loss

    def _before_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                            states: list[dict]) -> None:
        """Hook called right before the base update of one group's tensors that have a gradient (the old
        weights, as SPD's condition reads them)."""

    def _after_base_update(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict,
                           states: list[dict]) -> None:
        """Hook called right after the base update of one group's tensors that have a gradient (``grads`` are
        the gradients at the old weights)."""

    def _after_step(self) -> None:
        """Hook called once per ``step()`` after all tensors were updated."""

    # -- uniform extras --------------------------------------------------------------------------------

    def _first_param(self) -> torch.Tensor:
        return next(p for g in self.param_groups for p in g["params"])

    def regularizer(self, model: nn.Module | None = None) -> torch.Tensor:
        """The term to add to the task loss: a 0-D zero here (only :class:`L2SP` has one), on the device and
        in the dtype of the first parameter, so ``loss + opt.regularizer(model)`` works for every method.
        ``model`` is accepted for a uniform call; the tensors come from the optimizer's own groups."""
        p = self._first_param()
        return torch.zeros((), device=p.device, dtype=p.dtype)

    def _anchor(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        anchor = state.get("anchor")
        if anchor is None:
            raise RuntimeError(f"{self.method}: a constrained tensor of shape {tuple(p.shape)} has no anchor in the "
                               "optimizer state; was a state_dict from another method (or a plain torch "
                               "optimizer) loaded? Build the optimizer afresh from the pretrained weights instead")
        return anchor

    def _constrained(self):
        """``(group, param, state)`` for every constrained tensor that has an anchor."""
        for g in self.param_groups:
            if g["constrained"]:
                for p in g["params"]:
                    st = self.state.get(p)
                    if st is not None and "anchor" in st:
                        yield g, p, st
