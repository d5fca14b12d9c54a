"""Training checkpoints: atomic, rotated, safe to load, and complete enough for exact resume.

Layout of ``<output_dir>/checkpoints/checkpoint-000120/``::

    trainable.safetensors      trainable parameters by name (the LoRA, or the whole denoiser)
    optimizer.safetensors      optimizer state by parameter name: ``<name>/exp_avg``, ``<name>/step``, ...
    optimizer.json             its param groups (hyperparameters, parameter names) and non-tensor state
    lr_scheduler.pt, ema.pt    state dicts (tensors + numbers: loaded weights_only)
    extra.safetensors          other module state that moves during training (reward running stats)
    scaler.json                fp16 loss scaler state (scale, growth tracker), when loss scaling is on
    rng-<process>.json         python / numpy / torch (+ CUDA) RNG states of each process
    trainer_state.json         step, samples seen, consecutive non-finite steps, ...

Why our own format rather than ``accelerator.save_state``: accelerate stores the whole
(frozen) model and reloads custom state and RNG pickles with ``weights_only=False``; we store
only what trains, and nothing here unpickles code.

Everything is stored in full (unsharded) and keyed by parameter *name*, whatever the run's
``train.distributed``: under FSDP the shards are gathered for saving and re-sharded on load
(:class:`~imgalign.train.sharding.ShardedTrainable`), so a checkpoint resumes with DDP or FSDP
on any number of processes. (Checkpoints written before the optimizer state moved to
safetensors have ``optimizer.pt``, keyed by position; it still loads, ``weights_only``.)

A checkpoint is written into a hidden temporary directory and renamed into place once every
process has written its part, so a crash mid-write never leaves a half checkpoint that
``latest`` would pick. Rotation removes the oldest beyond ``total_limit``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import ordinary_permissions
from .sharding import full_tensor, shard_like

PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """Loop counters saved with every checkpoint (the data position is a function of ``step``)."""

    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # over all processes
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    run_id: str = ""  # which run wrote the checkpoint: rotation prunes only the current run's ("" = unknown)


def new_run_id() -> str:
    """A fresh run's identity (kept by every checkpoint it writes, and by a resume)."""
    return uuid.uuid4().hex[:12]


def checkpoint_run_id(path: Path) -> str | None:
    """The ``run_id`` a checkpoint was written by (None when unreadable or not recorded)."""
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("run_id") or None
    except (OSError, ValueError):
        return None


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, directory: str | Path) -> Path | None:
    """``"latest"`` -> the newest checkpoint in ``directory`` (None if there is none); else a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no trainer_state.json): {path}")
    return path


# ----------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Global RNG states as JSON-able data (no pickles)."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ----------------------------------------------------------------------------- save / load
def _state_to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_state_to_cpu(v) for v in obj)
    return obj


def _json_numbers(state: dict[str, Any]) -> dict[str, Any]:
    """A loss scaler's state dict (floats and ints, possibly 0-d tensors) as plain JSON numbers."""
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def read_trainable(path: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's ``trainable.safetensors``, refused in one line unless it holds exactly ``names``."""
    path = Path(path)
    saved = load_file(path / "trainable.safetensors")
    missing = sorted(set(names) - set(saved))
    unexpected = sorted(set(saved) - set(names))
    if missing or unexpected:
        raise ValueError(
            f"{path}: trainable parameters do not match the run (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it saved with another LoRA rank/targets or full fine-tuning?"
        )
    return saved


class CheckpointManager:
    """Save and restore the training state under ``directory`` (every process calls both).

    ``barrier`` is ``accelerator.wait_for_everyone`` in multi-process runs; the main process
    writes the shared parts and renames, every process writes its own RNG state.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        total_limit: int | None = None,
        process_index: int = 0,
        is_main: bool = True,
        barrier: Callable[[], None] = lambda: None,
        sharded: Any | None = None,
    ) -> None:
        """``sharded``: the run's :class:`~imgalign.train.sharding.ShardedTrainable` under FSDP (then
        every process must call :meth:`save` and :meth:`load`: gathering the shards is a collective)."""
        self.sharded = sharded
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.process_index = process_index
        self.is_main = is_main
        self.barrier = barrier

    def save(
        self,
        state: TrainerState,
        *,
        trainable: dict[str, torch.Tensor],
        optimizer: Any,
        lr_scheduler: Any,
        ema: Any | None = None,
        extra: dict[str, torch.Tensor] | None = None,
        config_yaml: str | None = None,
        scaler: Any | None = None,
    ) -> Path:
        """Write the checkpoint for ``state.step``; ``scaler``: the fp16 loss scaler (``accelerator.scaler``).

        The scaler's scale and growth tracker are training state too: a resumed run that
        restarted them would skip (overflow at the initial scale) steps the uninterrupted run took.
        """
        final = self.directory / checkpoint_name(state.step)
        tmp = self.directory / f".{final.name}.tmp"
        # Full tensors first, on every process (under FSDP each gather is a collective).
        if self.sharded is not None:
            weights = self.sharded.full_trainable()
            optimizer_state = self.sharded.full_optimizer_state(optimizer)
        else:
            weights = trainable
            optimizer_state = _named_optimizer_state(optimizer, trainable)
        ema_state = None
        if ema is not None:
            ema_state = ema.state_dict()
            ema_state["shadow_params"] = [full_tensor(t) for t in ema_state["shadow_params"]]
        extra = {k: full_tensor(v) for k, v in (extra or {}).items()}
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        if self.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
            _write_optimizer_state(optimizer_state, tmp)
            torch.save(_state_to_cpu(lr_scheduler.state_dict()), tmp / "lr_scheduler.pt")
            if ema_state is not None:
                torch.save(_state_to_cpu(ema_state), tmp / "ema.pt")
            if extra:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, tmp / "extra.safetensors")
            scaler_state = scaler.state_dict() if scaler is not None else {}
            if scaler_state:  # empty for a disabled scaler
                (tmp / "scaler.json").write_text(json.dumps(_json_numbers(scaler_state), indent=2))
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / f"rng-{self.process_index}.json").write_text(json.dumps(rng_state()))
        self.barrier()
        if self.is_main:
            ordinary_permissions(tmp)  # safetensors writes 0600 files whatever the umask
            if final.exists():  # re-saving the same step (e.g. the final step): replace it
                shutil.rmtree(final)
            tmp.rename(final)
            self._rotate(state.run_id)
        self.barrier()
        return final

    def _rotate(self, run_id: str = "") -> None:
        """Remove the oldest of *this run's* checkpoints beyond ``total_limit`` (never another run's)."""
        if not self.total_limit or self.total_limit < 1:
            return
        found = [p for p in list_checkpoints(self.directory) if checkpoint_run_id(p) == (run_id or None)]
        for old in found[: max(0, len(found) - self.total_limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: str | Path, **parts: Any) -> TrainerState:
        """Restore everything saved by :meth:`save` into the live objects; return the counters.

        A checkpoint that does not read (a truncated or corrupt file) is a one-line
        ``ValueError`` naming it and the way out, not the decoder's traceback.
        """
        try:
            return self._load(path, **parts)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - SafetensorError, RuntimeError (torch zip), EOFError, UnpicklingError
            if isinstance(err, ValueError) and str(path) in str(err):
                raise  # ours already: names the checkpoint and what does not match
            message = " ".join(str(err).split())[:160] or type(err).__name__
            raise ValueError(f"checkpoint {path} does not load ({type(err).__name__}: {message}); resume from an "
                             "earlier checkpoint (--resume DIR) or start over (--overwrite)") from err  # fmt: skip

    def _load(
        self,
        path: str | Path,
        *,
        trainable: dict[str, torch.nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
        ema: Any | None = None,
        extra_modules: dict[str, torch.nn.Module] | None = None,
        scaler: Any | None = None,
    ) -> TrainerState:
        path = Path(path)
        saved = read_trainable(path, trainable)
        if self.sharded is not None:
            self.sharded.load_trainable(saved)
        else:
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(saved[name].to(param.device, param.dtype))
        optimizer_state = _read_optimizer_state(path, optimizer, trainable)
        if self.sharded is not None:
            self.sharded.load_optimizer_state(optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(_positional_optimizer_state(optimizer_state, optimizer, trainable))
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
        if ema is not None:
            if not (path / "ema.pt").is_file():
                raise FileNotFoundError(f"{path}: the run uses EMA but the checkpoint has no ema.pt")
            ema.load_state_dict(torch.load(path / "ema.pt", map_location="cpu", weights_only=True))
            # shadow weights live with the params, sharded as they are
            ema.shadow_params = [shard_like(s, p) for s, p in zip(ema.shadow_params, trainable.values(), strict=True)]
        if extra_modules and (path / "extra.safetensors").is_file():
            extra = load_file(path / "extra.safetensors")
            for prefix, module in extra_modules.items():
                own = {k[len(prefix) + 1 :]: v for k, v in extra.items() if k.startswith(prefix + ".")}
                if own:
                    module.load_state_dict(own, strict=False)
        if scaler is not None:
            if (path / "scaler.json").is_file():
                scaler.load_state_dict(json.loads((path / "scaler.json").read_text()))
            else:
                warnings.warn(f"{path} has no scaler.json (saved without fp16 loss scaling): the loss scale "
                              "starts again from its initial value", stacklevel=2)  # fmt: skip
        rng_file = path / f"rng-{self.process_index}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        return TrainerState(**json.loads((path / "trainer_state.json").read_text()))

    @staticmethod
    def load_extra(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved in ``extra.safetensors`` under ``prefix.`` (prefix removed); empty if none."""
        file = Path(path) / "extra.safetensors"
        if not file.is_file():
            return {}
        return {k[len(prefix) + 1 :]: v for k, v in load_file(file).items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- optimizer state by name
def _parameter_order(optimizer: Any, trainable: dict[str, torch.Tensor]) -> list[str]:
    """The names of the optimizer's parameters in the order ``state_dict()`` numbers them."""
    by_id = {id(p): name for name, p in trainable.items()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _with_names(positional: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A positional optimizer state dict keyed by parameter names (the layout FSDP's full state has too)."""
    return {"state": {names[i]: value for i, value in positional["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in positional["param_groups"]]}  # fmt: skip


def _named_optimizer_state(optimizer: Any, trainable: dict[str, torch.Tensor]) -> dict[str, Any]:
    return _with_names(optimizer.state_dict(), _parameter_order(optimizer, trainable))


def _positional_optimizer_state(named: dict[str, Any], optimizer: Any, trainable: dict[str, torch.Tensor]) -> dict[str, Any]:
    position = {name: i for i, name in enumerate(_parameter_order(optimizer, trainable))}
    groups = []
    for saved, live in zip(named["param_groups"], optimizer.param_groups, strict=True):
        group = {k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v for k, v in saved.items()}
        groups.append({**group, "params": [position[n] for n in saved["params"]]})
    return {"state": {position[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _write_optimizer_state(named: dict[str, Any], directory: Path) -> None:
    tensors, scalars = {}, {}
    for name, per_param in named["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, directory / "optimizer.safetensors")
    groups = [{k: _json_value(v) for k, v in g.items()} for g in named["param_groups"]]
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


def _read_optimizer_state(path: Path, optimizer: Any, trainable: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The named optimizer state of a checkpoint (or of an older one's positional ``optimizer.pt``)."""
    if not (path / "optimizer.safetensors").is_file() and (path / "optimizer.pt").is_file():
        positional = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return _with_names(positional, list(trainable))  # the skeleton's optimizer takes the trainable dict in order
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[str, dict[str, Any]] = {}
    for key, value in load_file(path / "optimizer.safetensors").items():
        name, _, item = key.rpartition("/")
        state.setdefault(name, {})[item] = value
    for name, values in meta["scalars"].items():
        state.setdefault(name, {}).update(values)
    unknown = sorted(set(state) - set(trainable))
    if unknown:
        raise ValueError(f"{path}: optimizer state for parameters the run does not train ({unknown[:3]})")
    return {"state": state, "param_groups": meta["param_groups"]}


__all__ = ["CheckpointManager", "TrainerState", "checkpoint_name", "list_checkpoints", "read_trainable", "resolve_resume"]
