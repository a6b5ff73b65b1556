"""One registry class for every pluggable family: models, groups, canonicalizers, optimizers, metanetworks
(and, in ``equiray_pipelines``, the pipelines themselves).

A registry maps a name to a factory (or any object), so that configs, Tune search spaces and Serve deployments
name components by string (the timm pattern). Registering a name twice is refused unless ``overwrite=True``
says it is meant: a plugin that silently replaces a built-in is a bug that surfaces far away.

    MODELS = Registry("model")

    @MODELS.register
    def small_cnn(*, in_chans, num_classes, **kw): ...

    MODELS.register(SomeClass, name="other")
    MODELS.create("small_cnn", in_chans=1, num_classes=10)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar, overload

from equiray.errors import EquirayError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one family; ``kind`` is the family's name in error messages ("canonicalizer")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    @overload
    def register(self, obj: T, *, name: str | None = None, overwrite: bool = False) -> T: ...

    @overload
    def register(self, obj: None = None, *, name: str | None = None,
                 overwrite: bool = False) -> Callable[[T], T]: ...

    def register(self, obj=None, *, name=None, overwrite=False):
        """Register ``obj`` under ``name`` (default: its ``__name__``); returns ``obj``, so it works as a
        decorator, bare (``@REG.register``) or with arguments (``@REG.register(name="x")``)."""
        if obj is None:
            return lambda o: self.register(o, name=name, overwrite=overwrite)
        key = name if name is not None else getattr(obj, "__name__", None)
        if not key:
            raise EquirayError(f"a {self.kind} needs a name to be registered under")
        if key in self._items and self._items[key] is not obj and not overwrite:
            raise EquirayError(f"a {self.kind} named {key!r} is already registered; pick another name or pass "
                               "overwrite=True to replace it")
        self._items[key] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered under ``name``; an unknown name is an :class:`EquirayError` that lists the
        registered ones and suggests the closest."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise EquirayError(self.unknown(name)) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered under ``name``; options it does not take give an actionable error."""
        factory = self.get(name)
        try:
            return factory(*args, **kwargs)  # type: ignore[operator]
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            raise EquirayError(f"{self.kind} {name!r} does not take these options {sorted(kwargs)}: {exc}") from None

    def unknown(self, name: Any) -> str:
        """The message for an unknown name (shared with callers that check names before building)."""
        close = difflib.get_close_matches(str(name), list(self._items), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}{hint}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
