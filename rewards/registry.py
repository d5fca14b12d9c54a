"""Rewards by name.

``register(name, factory)`` adds a reward; ``factory(**options) -> Reward`` or a lazy
``"module:function"`` string (so heavy imports happen only when that reward is loaded).
Other packages add rewards through the ``imgalign.rewards`` entry-point group
(``[project.entry-points."imgalign.rewards"]``, ``name = "package.module:factory"``), read on
the first ``load`` or ``available`` call; a target module is imported only when its reward is
loaded, so ``rewards.load("shapes-verifier")`` works in a process that imported nothing else.
An explicit ``register`` (and the built-in rewards) wins over an entry point of the same name.
``load`` accepts:

* a registered name: ``load("hpsv2.1", checkpoint="/path/HPS_v2.1_compressed.pt")``;
* a weighted spec, as a mapping or a string: ``load({"hpsv2.1": 1.0, "clip": 0.5})``,
  ``load("hpsv2.1=1,clip=0.5")`` -> :class:`~rewards.composite.CompositeReward`;
* a path to a JSON description ``{"name": ..., "options": {...}}`` (or a directory holding
  ``reward.json``); relative paths (``"./..."``) anywhere inside ``options`` are resolved
  against its directory. ``imgalign train-reward`` writes such directories
  (``{"name": "trained-reward", ...}`` + ``model.safetensors``);
* a served reward, ``"remote:http://host:port"`` -> :class:`~rewards.remote.RemoteReward`
  (``imgalign serve-reward`` serves one; options: its timeouts, retries and wire format). It can
  be a member of a weighted spec, so its URL holds no ``,`` or ``=``.

An option the reward does not take is a ``ValueError`` naming the reward and the options it
does take (read from its factory's signature, following ``**options`` into the Reward class
the factory is annotated to return), so a CLI reports it in one line.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import typing
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from .base import Reward

__all__ = ["ENTRY_POINT_GROUP", "available", "load", "parse_spec", "register"]

ENTRY_POINT_GROUP = "imgalign.rewards"
#: A served reward's spec starts with this (``remote:http://host:port``); see :mod:`rewards.remote`.
REMOTE_PREFIX = "remote:"

Factory = Callable[..., Reward]
_REGISTRY: dict[str, Factory | str] = {}  # explicit registrations (built-ins included)
_PLUGINS: dict[str, EntryPoint] | None = None  # the entry points, once read


def _key(name: str) -> str:
    return name.strip().lower()


def register(name: str, factory: Factory | str, *, overwrite: bool = False) -> None:
    """Make ``load(name, **options)`` call ``factory(**options)``.

    ``overwrite`` guards against replacing another explicit registration; an entry point of
    the same name is shadowed without it (explicit code beats installed metadata).
    """
    key = _key(name)
    if not key or any(c in key for c in ",="):
        raise ValueError(f"invalid reward name {name!r} (no ',' or '=' allowed)")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError("factory must be callable or a 'module:function' string")
    _REGISTRY[key] = factory


def _plugins() -> dict[str, EntryPoint]:
    """The ``imgalign.rewards`` entry points by name, read once (their modules stay unimported)."""
    global _PLUGINS
    if _PLUGINS is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            found.setdefault(_key(ep.name), ep)  # the first installed distribution wins
        _PLUGINS = found
    return _PLUGINS


def _is_registered(name: str) -> bool:
    key = _key(name)
    return key in _REGISTRY or key in _plugins()


def available() -> list[str]:
    """Registered names and those of installed plugins (``imgalign.rewards`` entry points)."""
    return sorted(set(_REGISTRY) | set(_plugins()))


def _factory(name: str) -> Factory:
    key = _key(name)
    if key not in _REGISTRY:
        ep = _plugins().get(key)
        if ep is None:
            raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
        try:
            f = ep.load()
        except (ImportError, AttributeError) as err:
            raise ImportError(f"reward {name!r}: cannot load entry point {ep.value!r} ({ENTRY_POINT_GROUP}): {err}") from err
        if not callable(f):
            raise TypeError(f"reward {name!r}: entry point {ep.value!r} is not callable")
        return f
    f = _REGISTRY[key]
    if isinstance(f, str):
        module, _, attr = f.partition(":")
        f = getattr(importlib.import_module(module), attr)
        _REGISTRY[key] = f
    return f


def parse_spec(spec: str) -> dict[str, float]:
    """``"a=1,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}``; a bare name has weight 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.partition("=")
        name = name.strip()
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for reward {name!r} in {spec!r}") from None
        if not name:
            raise ValueError(f"empty reward name in {spec!r}")
        if not math.isfinite(w):
            raise ValueError(f"weight {weight.strip()!r} for reward {name!r} in {spec!r} is not a finite number")
        if name in out:
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        out[name] = w
    if not out:
        raise ValueError(f"empty reward spec {spec!r}")
    return out


# ----------------------------------------------------------------------------- options
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")
_NO_OPTIONS = {"object.__init__", "Module.__init__"}  # a class that defines no constructor of its own


def _rejected_option(err: TypeError, options: Mapping) -> str | None:
    """The caller's option that ``err`` (raised by calling a factory) says was not accepted, if any."""
    match = _UNEXPECTED.search(str(err))
    return match.group(1) if match and match.group(1) in options else None


def _forwards_to(target: Callable) -> Callable | None:
    """Where a callable's ``**options`` go: the Reward class a factory is annotated to return
    (its ``from_options`` if it has one), or the class of a ``from_options`` classmethod."""
    if isinstance(target, type):
        return None  # a constructor that takes **kwargs itself: open-ended
    owner = getattr(target, "__self__", None)
    if isinstance(owner, type):
        return owner
    try:
        returned = typing.get_type_hints(target).get("return")
    except Exception:  # unresolvable annotations: nothing to follow
        return None
    if isinstance(returned, type) and issubclass(returned, Reward):
        return getattr(returned, "from_options", None) or returned
    return None


def _accepted_options(factory: Callable) -> list[str] | None:
    """The keyword options ``factory`` takes, following ``**options`` the way the built-in
    factories forward them (``factory -> Class.from_options -> Class``); None when open-ended."""
    names: set[str] = set()
    target: Callable | None = factory
    for _ in range(4):
        if isinstance(target, type) and getattr(target.__init__, "__qualname__", "") in _NO_OPTIONS:
            return sorted(names)
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return sorted(names)
        target = _forwards_to(target)
        if target is None:
            return None
    return None


def _option_message(name: str, option: str, factory: Callable) -> str:
    accepted = _accepted_options(factory)
    if accepted is None:
        where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"
        takes = f"see {where} for the options it takes"
    elif accepted:
        takes = f"its options are: {', '.join(accepted)}"
    else:
        takes = "it takes no options"
    return f"reward {name!r} does not take the option {option!r}; {takes}"


def _resolve_relative(value, base: Path):
    """``"./x"`` / ``"../x"`` strings -> absolute paths against ``base``, at any depth of nesting
    (a trained reward nests its base reward's options)."""
    if isinstance(value, str) and (value.startswith("./") or value.startswith("../") or value == "."):
        return str((base / value).resolve())
    if isinstance(value, dict):
        return {k: _resolve_relative(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_relative(v, base) for v in value]
    return value


def _load_json(path: Path, options: dict) -> Reward:
    file = path / "reward.json" if path.is_dir() else path
    desc = json.loads(file.read_text())
    if not isinstance(desc, dict) or "name" not in desc:
        raise ValueError(f"{file}: expected a JSON object with 'name' and optional 'options'")
    opts = _resolve_relative(dict(desc.get("options", {})), file.parent)
    opts.update(options)
    return load(desc["name"], **opts)


def _load_remote(spec: str, options: dict) -> Reward:
    """``remote:<url>``: the client of a served reward (imported only when one is asked for)."""
    from .remote import RemoteReward

    try:
        return RemoteReward(spec, **options)
    except TypeError as err:
        bad = _rejected_option(err, options)
        if bad is None:
            raise
        raise ValueError(_option_message(spec, bad, RemoteReward)) from err


def load(name_or_path: str | Mapping[str, float], **options) -> Reward:
    """Build a reward from a name, a weighted spec, or a JSON description (see module doc)."""
    if isinstance(name_or_path, Mapping):
        from .composite import CompositeReward

        members = {}
        for name, weight in name_or_path.items():
            members[name] = (load(name, **options.get(name, {}) if isinstance(options.get(name), Mapping) else {}), float(weight))
        extra = {k: v for k, v in options.items() if k not in name_or_path}
        return CompositeReward(members, **extra)
    if not isinstance(name_or_path, str):
        raise TypeError(f"load() takes a name, a path or a mapping name->weight, got {type(name_or_path).__name__}")
    if "," in name_or_path or "=" in name_or_path:
        return load(parse_spec(name_or_path), **options)
    if name_or_path.strip().lower().startswith(REMOTE_PREFIX):
        return _load_remote(name_or_path, options)
    if _is_registered(name_or_path):
        factory = _factory(name_or_path)
        try:
            reward = factory(**options)
        except TypeError as err:
            bad = _rejected_option(err, options)
            if bad is None:  # a TypeError from inside the factory: not about the caller's options
                raise
            raise ValueError(_option_message(name_or_path, bad, factory)) from err
        if not isinstance(reward, Reward):
            raise TypeError(f"factory for {name_or_path!r} returned {type(reward).__name__}, not a Reward")
        return reward
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file() or (path.is_dir() and (path / "reward.json").is_file()):
        return _load_json(path, options)
    raise ValueError(
        f"unknown reward {name_or_path!r}: not a registered name ({', '.join(available())}) "
        f"nor a reward.json file/directory"
    )
