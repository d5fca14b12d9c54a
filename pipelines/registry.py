"""Pipelines by name: ``pipelines.load("shapes")`` next to directories and hub ids.

A named pipeline is a factory ``factory(*, dtype, device, attention, **options) -> DiffusionAdapter``
(or a lazy ``"module:function"`` string), which usually resolves its weights and calls
``pipelines.load`` on them. ``register(name, factory)`` adds one in this process; installed
packages add theirs through the ``imgalign.pipelines`` entry-point group
(``[project.entry-points."imgalign.pipelines"]``, ``name = "package.module:factory"``), read on
the first ``load`` or ``available`` call, their modules imported only when that pipeline is
loaded. An explicit ``register`` wins over an entry point of the same name.

Names never contain ``/``, so they cannot be hub ids; a local directory whose name is also a
registered name is reached as ``./name``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "available", "factory", "is_registered", "register"]

ENTRY_POINT_GROUP = "imgalign.pipelines"

Factory = Callable[..., Any]
_REGISTRY: dict[str, Factory | str] = {}  # explicit registrations
_PLUGINS: dict[str, EntryPoint] | None = None  # the entry points, once read


def _key(name: str) -> str:
    return name.strip().lower()


def register(name: str, factory: Factory | str, *, overwrite: bool = False) -> None:
    """Make ``pipelines.load(name, **options)`` return ``factory(**options)``."""
    key = _key(name)
    if not key or any(c in key for c in "/\\") or key.startswith((".", "~")):
        raise ValueError(f"invalid pipeline name {name!r} (no '/', and not a relative path)")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"pipeline {name!r} is already registered; pass overwrite=True to replace it")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError("factory must be callable or a 'module:function' string")
    _REGISTRY[key] = factory


def _plugins() -> dict[str, EntryPoint]:
    """The ``imgalign.pipelines`` entry points by name, read once (their modules stay unimported)."""
    global _PLUGINS
    if _PLUGINS is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(_key(ep.name), ep)  # the first installed distribution wins
        _PLUGINS = found
    return _PLUGINS


def available() -> list[str]:
    """Registered pipeline names, including those of installed plugins."""
    return sorted(set(_REGISTRY) | set(_plugins()))


def is_registered(name: str) -> bool:
    key = _key(name)
    return key in _REGISTRY or key in _plugins()


def factory(name: str) -> Factory:
    """The factory registered as ``name`` (imported now if it was given lazily)."""
    key = _key(name)
    if key in _REGISTRY:
        f = _REGISTRY[key]
        if isinstance(f, str):
            module, _, attr = f.partition(":")
            f = _REGISTRY[key] = getattr(importlib.import_module(module), attr)
        return f
    ep = _plugins().get(key)
    if ep is None:
        raise ValueError(f"unknown pipeline {name!r}; registered: {', '.join(available()) or 'none'}")
    try:
        f = ep.load()
    except (ImportError, AttributeError) as err:
        raise ImportError(f"pipeline {name!r}: cannot load entry point {ep.value!r} ({ENTRY_POINT_GROUP}): {err}") from err
    if not callable(f):
        raise TypeError(f"pipeline {name!r}: entry point {ep.value!r} is not callable")
    return f
