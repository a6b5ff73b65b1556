"""Model registry: equiray's own models by name, everything else by timm name (the timm pattern)."""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from equiray.errors import EquirayError
from equiray.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   overwrite: bool = False):
    """Register ``fn(*, in_chans, num_classes, pretrained, **kwargs)`` under its function name (or ``name``);
    a name taken already is refused unless ``overwrite``. Works bare or with arguments as a decorator."""
    return MODELS.register(fn, name=name, overwrite=overwrite)


def list_models(pattern: str | None = None, *, include_timm: bool = False) -> list[str]:
    """equiray's own model names (and timm's, matching the fnmatch ``pattern``, when ``include_timm``)."""
    import fnmatch

    names = MODELS.names()
    if include_timm:
        import timm

        names += timm.list_models(pattern or "*")
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    if name in MODELS:
        return True
    import timm

    return timm.is_model(name)


def create_model(name: str, *, in_chans: int = 1, num_classes: int = 10, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build a model by name: equiray's own (see :func:`list_models`) or any timm model.

    ``pretrained=True`` takes timm's real hub weights (needs a network); equiray's own models have none: their
    pretrained weights come from an equiray pipeline through the MLflow registry.
    """
    if name in MODELS:
        return MODELS.get(name)(in_chans=in_chans, num_classes=num_classes, pretrained=pretrained, **kwargs)
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, MODELS.names() + timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise EquirayError(f"unknown model {name!r}: neither an equiray model ({', '.join(MODELS.names())}) "
                           f"nor a timm model.{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except TypeError as exc:  # an unknown keyword for that model family
        raise EquirayError(f"model {name!r} does not accept these options {sorted(kwargs)}: {exc}") from exc
