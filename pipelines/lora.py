"""LoRA on the denoiser through peft, saved in the diffusers LoRA format.

* ``add_lora`` injects adapters with peft (``denoiser.add_adapter``); only they train.
* ``lora_disabled`` turns them off temporarily: the disabled model *is* the reference
  model (DPO, GRPO's KL), with no second copy in memory.
* ``set_active_lora`` / ``active_loras`` switch between several named adapters on one
  denoiser (one per timestep segment in timestep-segment DPO); ``lora_state_restored`` puts
  the switches back afterwards.
* ``save_lora`` unwraps accelerate/DDP/``torch.compile`` wrappers first (a LoRA saved
  under a ``module.`` or ``_orig_mod.`` prefix reloads with no effect: flow_grpo #87),
  converts peft keys to the diffusers layout and writes ``pytorch_lora_weights.safetensors``
  with the adapter config as metadata, so a plain ``pipe.load_lora_weights(dir)`` reproduces
  the trained outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .adapter import DiffusionAdapter

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/FSDP/DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False, keep_torch_compile=False)


def add_lora(
    adapter: DiffusionAdapter,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to the denoiser, freeze everything else, return the LoRA parameters.

    ``alpha`` defaults to ``rank`` (scale 1). LoRA B starts at zero, so the model's outputs
    are unchanged until it trains.
    """
    from peft import LoraConfig

    denoiser = unwrap_model(adapter.denoiser)
    for module in _frozen_modules(adapter):
        module.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    denoiser.add_adapter(config, adapter_name=adapter_name)
    params = lora_parameters(adapter)
    for p in params:
        p.data = p.data.float()  # train LoRA in fp32 even on a half-precision base
    return params


def lora_parameters(adapter: DiffusionAdapter) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of the denoiser."""
    return [p for n, p in unwrap_model(adapter.denoiser).named_parameters() if "lora_" in n and p.requires_grad]


def has_lora(adapter: DiffusionAdapter) -> bool:
    return any("lora_" in n for n, _ in unwrap_model(adapter.denoiser).named_parameters())


@contextlib.contextmanager
def lora_disabled(adapter: DiffusionAdapter) -> Iterator[None]:
    """Run the base (reference) model: LoRA layers are bypassed inside the block."""
    denoiser = unwrap_model(adapter.denoiser)
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def lora_names(adapter: DiffusionAdapter) -> list[str]:
    """Names of the LoRA adapters loaded on the denoiser, active or not, in loading order."""
    return list(getattr(unwrap_model(adapter.denoiser), "peft_config", None) or {})


def active_loras(adapter: DiffusionAdapter) -> list[str]:
    """The LoRA adapters the denoiser's forward uses now; empty when none is loaded or all are disabled.

    Read from the LoRA layers themselves (not from a flag kept beside them), so it reports
    what a forward pass will actually run.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    for module in unwrap_model(adapter.denoiser).modules():
        if isinstance(module, BaseTunerLayer) and not module.disable_adapters:
            names += [n for n in module.active_adapters if n not in names]
    return names


def set_active_lora(adapter: DiffusionAdapter, name: str | Sequence[str] | None) -> None:
    """Make exactly the adapter ``name`` active on the denoiser; ``None`` disables all (the base model).

    A sequence of names activates those adapters together. Uses diffusers' ``set_adapter`` /
    ``enable_adapters`` / ``disable_adapters``. Side effect, from peft: switching also sets
    ``requires_grad``, True on the active adapters' parameters and False on all the others (on
    every adapter's when disabled). So a trainer that keeps several adapters' parameters in one
    optimizer must collect them by name, not by ``requires_grad``; and code that switches
    adapters on a model being trained should run inside :func:`lora_state_restored`.
    """
    denoiser = unwrap_model(adapter.denoiser)
    loaded = lora_names(adapter)
    if name is None:
        if loaded:
            denoiser.disable_adapters()
        return
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("set_active_lora takes an adapter name, a list of names, or None (the base model)")
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(
            f"no LoRA adapter named {missing[0]!r} on the {adapter.denoiser_name}; loaded: {', '.join(loaded) or 'none'}"
        )
    denoiser.enable_adapters()
    denoiser.set_adapter(names)


@contextlib.contextmanager
def lora_state_restored(adapter: DiffusionAdapter) -> Iterator[None]:
    """Switch adapters freely inside the block; on exit they are as they were on entry.

    Restores each LoRA layer's active adapters and disabled flag, and every LoRA parameter's
    ``requires_grad`` (which switching changes, see :func:`set_active_lora`).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    denoiser = unwrap_model(adapter.denoiser)
    layers = [(m, list(m.active_adapters), m.disable_adapters) for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for n, p in denoiser.named_parameters() if "lora_" in n]
    try:
        yield
    finally:
        for module, active, disabled in layers:
            module.set_adapter(active)
            module.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_lora(adapter: DiffusionAdapter, directory: str | os.PathLike, *, adapter_name: str = "default") -> Path:
    """Write the LoRA in the diffusers format, atomically (temporary directory, then rename)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    denoiser = unwrap_model(adapter.denoiser)
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    state = convert_state_dict_to_diffusers({k: v.detach().cpu().contiguous() for k, v in state.items()})
    metadata = denoiser.peft_config[adapter_name].to_dict()
    layers_key = f"{adapter.denoiser_name}_lora_layers"
    metadata_key = f"{adapter.denoiser_name}_lora_adapter_metadata"
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the LoRA gets the umask's ordinary permissions, not 0700
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        type(adapter.pipe).save_lora_weights(
            tmp, **{layers_key: state, metadata_key: metadata}, weight_name=WEIGHT_NAME, safe_serialization=True
        )
        _ordinary_permissions(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_lora(adapter: DiffusionAdapter, directory: str | os.PathLike, *, adapter_name: str = "default") -> None:
    """Load a diffusers-format LoRA into the adapter's pipeline (what users do with diffusers).

    ``directory`` holds ``pytorch_lora_weights.safetensors`` (or is that file). What diffusers
    reports as a logged error, a warning or not at all (a directory without weights, a
    corrupt file, another architecture's LoRA whose shapes do not fit, or whose keys match no
    module, so that nothing loads) is a one-line ``ValueError`` here, naming the directory.
    """
    path = Path(directory)
    if not path.exists():
        raise FileNotFoundError(f"LoRA directory not found: {path}")
    weights = _lora_weights_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            count = len(list(handle.keys()))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file does not read
        raise ValueError(f"{weights} is not a readable safetensors file ({_one_line(err)}); "
                         "save or download the LoRA again") from None  # fmt: skip
    if count == 0:
        raise ValueError(f"{weights} holds no tensors: not a trained LoRA")
    with _quiet_diffusers():
        try:
            adapter.pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            text = _one_line(err)
            reason = "its weight shapes differ from the model's layers" if "size mismatch" in text else text[:120]
            raise ValueError(f"LoRA {path} does not fit this {adapter.family} pipeline ({reason}); "
                             "was it trained on another model?") from None  # fmt: skip
    if adapter_name not in lora_names(adapter):
        raise ValueError(f"LoRA {path}: none of its {count} weights match this {adapter.family} pipeline's "
                         f"{adapter.denoiser_name}; was it trained on another model?")  # fmt: skip


def _lora_weights_file(path: Path) -> Path:
    """The LoRA's safetensors file in ``path`` (the diffusers name, or the only ``*.safetensors`` there)."""
    if path.is_file():
        return path
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    listed = f" (found {', '.join(p.name for p in found)})" if found else ""
    raise ValueError(f"{path} holds no {WEIGHT_NAME}{listed}: not a diffusers LoRA directory "
                     "(pipelines.save_lora and pipe.save_lora_weights write one)")  # fmt: skip


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Hide what diffusers and peft log or warn while loading a LoRA: failures become our own error."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _frozen_modules(adapter: DiffusionAdapter) -> list[torch.nn.Module]:
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for n in names if isinstance(m := getattr(adapter.pipe, n, None), torch.nn.Module)]


def _ordinary_permissions(root: Path) -> None:
    """Give ``root`` and everything in it the umask's ordinary modes (0644 / 0755 under umask 022).

    safetensors' ``save_file`` creates its files 0600 whatever the umask, so a weight file that
    others on a shared machine (or a serving container) must read would otherwise be private.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "active_loras",
    "add_lora",
    "has_lora",
    "load_lora",
    "lora_disabled",
    "lora_names",
    "lora_parameters",
    "lora_state_restored",
    "save_lora",
    "set_active_lora",
    "unwrap_model",
]
