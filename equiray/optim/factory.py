"""The optimizer family by name: the registry :data:`OPTIMIZERS`, :func:`make_optimizer` (build one for a model,
its head found and left unconstrained) and :func:`method_knobs` (the hyperparameters each method adds).

Each method registers itself under its ``method`` name (``@register_optimizer``), so configs and Tune search
spaces name methods by string: ``make_optimizer("ftp", model, lr=1e-4, weight_decay=0.05, k=0.5)``.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
from typing import Any, Sequence, TypeVar

import torch.nn as nn

from equiray.errors import ConfigError
from equiray.optim.base import RobustOptimizer, _few, _split_named
from equiray.registry import Registry

log = logging.getLogger(__name__)

#: Every robust fine-tuning method by name (``"finetune"``, ``"ftp"``, ``"l2sp"``, ``"tpgm"``).
OPTIMIZERS: Registry[type[RobustOptimizer]] = Registry("optimizer")
#: The old name of :data:`OPTIMIZERS` (``name in METHODS``, ``sorted(METHODS)`` keep working).
METHODS = OPTIMIZERS

#: Patterns ``make_optimizer`` tries when ``exclude=None`` (those that match something are used).
DEFAULT_HEAD_PATTERNS = ("head.*", "fc.*", "classifier.*", "head", "fc", "classifier")

O = TypeVar("O", bound=type[RobustOptimizer])


def register_optimizer(cls: O) -> O:
    """Class decorator: register a :class:`RobustOptimizer` subclass under its ``method`` name."""
    return OPTIMIZERS.register(cls, name=cls.method)


def _method(name: str) -> type[RobustOptimizer]:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS.names()}")
    return OPTIMIZERS.get(name)


def method_knobs(name: str) -> tuple[str, ...]:
    """The hyperparameters method ``name`` adds to the base optimizer's (``base``, ``lr``, ``weight_decay``,
    ``betas``, ...), in the order of its constructor: ``("k", "mu", "gamma_init")`` for FTP, ``("alpha",
    "beta")`` for L2-SP, ``("radius_lr",)`` for TPGM, ``()`` for plain fine-tuning. Read from the class's
    constructor (the keywords :class:`RobustOptimizer` does not take, less its ``loop_options``), so a knob is
    written once, in its method's signature. Unknown names raise ``ConfigError``."""
    cls = _method(name)
    shared = inspect.signature(RobustOptimizer.__init__).parameters
    return tuple(n for n in inspect.signature(cls.__init__).parameters
                 if n not in shared and n not in cls.loop_options)


def _knobs_of(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters
            if n not in ("self", "params", "lr", "weight_decay", "exclude", "model")]


def _head_patterns(model: nn.Module) -> tuple[str, ...]:
    """Names of the classifier head: timm's ``get_classifier()`` parameters if any, else the patterns of
    ``DEFAULT_HEAD_PATTERNS`` that match a parameter name."""
    names = [n for n, _ in model.named_parameters()]
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except Exception:  # noqa: BLE001 -- a model's own get_classifier may not apply; fall back to names
            head = None
        if isinstance(head, nn.Module):
            ids = {id(p) for p in head.parameters()}
            found = tuple(n for n, p in model.named_parameters() if id(p) in ids)
            if found:
                return found
    return tuple(pat for pat in DEFAULT_HEAD_PATTERNS if any(fnmatch.fnmatchcase(n, pat) for n in names))


def make_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float,
                   exclude: Sequence[str] | None = None, **knobs: Any) -> RobustOptimizer:
    """Build one of ``"finetune"``, ``"l2sp"``, ``"ftp"``, ``"tpgm"`` for ``model``'s trainable parameters.

    ``exclude`` lists fnmatch patterns of the *new* head's parameter names (left unconstrained by FTP/TPGM,
    ``beta``-penalised by L2-SP). ``None`` finds the head: timm's ``model.get_classifier()`` when it has
    parameters, else whichever of ``DEFAULT_HEAD_PATTERNS`` (``head.*``, ``fc.*``, ``classifier.*``) match; if
    none does, the constrained methods raise and ask for explicit patterns (``exclude=()`` constrains all).
    Every explicit pattern must match some parameter. Parameters with ``requires_grad=False`` are left out of
    the optimizer (and get no anchor).

    ``knobs`` are the method's keyword arguments (see :class:`FTP`, :class:`L2SP`, :class:`TPGM`,
    :class:`FineTune`), e.g. ``base="sgd", momentum=0.9, k=0.5, mu=1e-2, gamma_init=1e-8``. For TPGM, pass
    ``val_batches``, ``loss_fn`` and ``projection_interval`` to project inside ``step()`` (``model`` is filled in).
    Unknown names and unknown knobs raise ``ConfigError`` (a ``ValueError``) listing the valid ones.
    """
    cls = _method(name)
    allowed = _knobs_of(cls)
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options are {allowed} "
                          "(plus lr, weight_decay, exclude)")
    all_named = list(model.named_parameters())
    if exclude is None:
        exclude = _head_patterns(model)
        if not exclude and cls._constrains:
            raise ConfigError(f"{name}: could not find the classifier head among the parameter names "
                              f"({_few([n for n, _ in all_named])}); pass exclude=('yourhead.*',) or exclude=() "
                              "to constrain every parameter")
        log.info("%s: excluding the head %s from the constraint", name, list(exclude))
    elif isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    # validate the patterns against every name (a pattern may match only frozen tensors), then drop frozen ones
    groups = _split_named(all_named, exclude, method=name)
    for g in groups:
        g["params"] = [(n, p) for n, p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(f"{name}: the model has no parameter with requires_grad=True")
    if name == "tpgm" and any(k in knobs for k in ("val_batches", "loss_fn")):
        knobs = {**knobs, "model": model}
    return cls(groups, lr=lr, weight_decay=weight_decay, **knobs)
