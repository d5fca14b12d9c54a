"""Safe, offline-friendly checkpoint loading.

* Tensors only: ``.safetensors`` through :mod:`safetensors`, anything else through
  ``torch.load(weights_only=True)``. A checkpoint that needs arbitrary unpickling (custom
  classes, ``__reduce__`` payloads) is refused with :class:`UnsafeCheckpointError`; nothing
  in it is executed.
* Hub ids or local paths: a local file or directory is used as is; otherwise the name is a
  Hugging Face repo id and :func:`huggingface_hub.hf_hub_download` /
  :func:`~huggingface_hub.snapshot_download` fetch it -- with ``HF_HUB_OFFLINE=1`` they only
  read the local cache. Failures raise :class:`MissingWeightsError` naming the missing file
  and the option (or path) that supplies it.
* Weights are never downloaded just to be overwritten: models are built from config with
  random weights and the checkpoint is loaded over them.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "MissingWeightsError",
    "UnsafeCheckpointError",
    "load_into",
    "load_state_dict",
    "resolve_dir",
    "resolve_file",
    "unwrap_state_dict",
]


class MissingWeightsError(FileNotFoundError):
    """A weight/config file is neither local nor in the Hugging Face cache."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint needs arbitrary unpickling, which we refuse."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_file(path_or_repo: str | os.PathLike, filename: str | None, option: str, **hub_kwargs) -> Path:
    """Local path of ``filename`` in a local file/dir or a hub repo (cache only when offline).

    ``option`` names the keyword that supplies the file; it appears in the error message.
    """
    p = Path(path_or_repo).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if filename is None:
            raise MissingWeightsError(f"{p} is a directory; {option} must point to a file")
        candidate = p / filename
        if candidate.is_file():
            return candidate
        raise MissingWeightsError(f"{filename} not found in {p}; pass {option}=/path/to/{filename}")
    repo = str(path_or_repo)
    if filename is None or repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise MissingWeightsError(
            f"{repo} is not a local file and not a hub repo id; pass {option}=/path/to/{filename or 'checkpoint'}"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, **hub_kwargs))
    except Exception as err:  # EntryNotFound, LocalEntryNotFound, OfflineModeIsEnabled, HTTP errors...
        where = "the Hugging Face cache (HF_HUB_OFFLINE=1)" if _offline() else f"hub repo {repo}"
        raise MissingWeightsError(
            f"{filename} of {repo} not found in {where}: pass {option}=/path/to/{filename}, "
            f"or download it once with `hf download {repo} {filename}` ({type(err).__name__})"
        ) from None


def resolve_dir(
    path_or_repo: str | os.PathLike,
    option: str,
    allow_patterns: Iterable[str] | None = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"),
    required: str = "config.json",
) -> Path:
    """Local directory of a transformers-style model (a local dir, or a cached hub snapshot)."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        if required and not (p / required).is_file():
            raise MissingWeightsError(f"{required} not found in {p}; pass {option}=<model directory or hub id>")
        return p
    repo = str(path_or_repo)
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(repo, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except Exception as err:
        where = "the Hugging Face cache (HF_HUB_OFFLINE=1)" if _offline() else "the hub"
        raise MissingWeightsError(
            f"model {repo} not found in {where}: pass {option}=/path/to/model_dir (with {required}), "
            f"or download it once with `hf download {repo}` ({type(err).__name__})"
        ) from None
    if required and not (d / required).is_file():
        raise MissingWeightsError(f"{required} missing from the cached snapshot of {repo}; pass {option}=<dir>")
    return d


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load a checkpoint file without executing code: safetensors or weights-only pickle."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling (weights_only=True failed: "
            f"{str(err).splitlines()[0][:200]}). Only tensors are loaded; convert it to safetensors "
            f"in an environment you trust, e.g. safetensors.torch.save_file(state_dict, 'model.safetensors')"
        ) from None
    except RuntimeError as err:
        if "weights_only" in str(err) or "Unsupported" in str(err):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: not loadable with weights_only=True ({str(err).splitlines()[0][:200]})"
            ) from None
        raise


def unwrap_state_dict(obj, keys: Iterable[str] = ("state_dict", "model", "module"), strip_prefix: str = "module.") -> dict[str, Tensor]:
    """Take the tensor dict out of ``{'state_dict': ...}``-style wrappers; strip DDP prefixes."""
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for k in keys:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
        else:
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if strip_prefix and sd and all(k.startswith(strip_prefix) for k in sd):
        sd = {k[len(strip_prefix) :]: v for k, v in sd.items()}
    return sd


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str,
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> None:
    """``load_state_dict(strict=True)`` with a readable error listing missing/unexpected keys.

    ``ignore_*`` are key suffixes tolerated (e.g. non-persistent ``position_ids`` buffers).
    """
    ign_u, ign_m = tuple(ignore_unexpected), tuple(ignore_missing)
    sd = {k: v for k, v in state_dict.items() if not (ign_u and k.endswith(ign_u))}
    result = module.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not (ign_m and k.endswith(ign_m))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
        raise ValueError(f"{what}: checkpoint does not match the model: " + "; ".join(parts))
