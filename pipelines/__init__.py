"""pipelines: adapters over diffusers pipelines — a denoiser we can step, score and differentiate.

    import pipelines
    adapter = pipelines.load("stabilityai/stable-diffusion-3.5-medium", dtype=torch.bfloat16, device="cuda")
    images = adapter.sample(["a red cube"], num_steps=28, guidance_scale=4.5,
                            generator=[torch.Generator("cpu").manual_seed(0)])

``load`` accepts a registered name (``"shapes"``: see :mod:`pipelines.registry`), a local
pipeline directory, a hub id (the hub cache is used when offline), or a diffusers pipeline
already in memory, and picks the adapter from the pipeline class. Named pipelines come from
``pipelines.register(name, factory)`` or from installed packages' ``imgalign.pipelines``
entry points. This package never imports ``imgalign`` or ``rewards``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from . import registry
from .adapter import Conditioning, DiffusionAdapter, Schedule, cond_batch_size
from .attention import BACKENDS, AttentionBackendError
from .flow import FluxAdapter, FluxKontextAdapter, StableDiffusion3Adapter
from .lora import (
    active_loras,
    add_lora,
    has_lora,
    load_lora,
    lora_disabled,
    lora_names,
    lora_parameters,
    lora_state_restored,
    save_lora,
    set_active_lora,
    unwrap_model,
)
from .registry import available, register
from .shapes import ShapesAdapter, ShapesPipeline
from .shapes_edit import ShapesEditAdapter, ShapesEditPipeline
from .stable_diffusion import InstructPix2PixAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter
from .steps import (
    StepOutput,
    ddim_step_with_logprob,
    flow_cps_step_with_logprob,
    flow_sde_step_with_logprob,
    gaussian_log_prob,
)

ADAPTERS: dict[str, type[DiffusionAdapter]] = {}


class UnsupportedPipelineError(ValueError):
    """The pipeline class has no adapter."""


def register_adapter(adapter_cls: type[DiffusionAdapter]) -> type[DiffusionAdapter]:
    """Make ``load`` pick ``adapter_cls`` for each of its ``pipeline_classes``."""
    for name in adapter_cls.pipeline_classes:
        ADAPTERS[name] = adapter_cls
    return adapter_cls


for _cls in (
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    InstructPix2PixAdapter,
    StableDiffusion3Adapter,
    FluxAdapter,
    FluxKontextAdapter,
    ShapesAdapter,
    ShapesEditAdapter,
):
    register_adapter(_cls)


def adapter_for(pipeline_class_name: str) -> type[DiffusionAdapter]:
    try:
        return ADAPTERS[pipeline_class_name]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedPipelineError(
            f"pipeline class {pipeline_class_name!r} is not supported; supported: {supported}"
        ) from None


def load(
    source: str | os.PathLike | Any,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attention: str = "sdpa",
    **from_pretrained_kwargs: Any,
) -> DiffusionAdapter:
    """Wrap a pipeline object, or load one from a registered name / directory / hub id, in its family's adapter."""
    if isinstance(source, str) and registry.is_registered(source):
        adapter = registry.factory(source)(dtype=dtype, device=device, attention=attention, **from_pretrained_kwargs)
        if not isinstance(adapter, DiffusionAdapter):
            raise TypeError(f"the factory of pipeline {source!r} returned {type(adapter).__name__}, not a DiffusionAdapter")
        return adapter
    if not isinstance(source, (str, os.PathLike)):
        adapter = adapter_for(type(source).__name__)(source)
    else:
        path = Path(source)
        if path.exists():
            index = path / "model_index.json"
            if not index.is_file():
                raise FileNotFoundError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
            try:
                class_name = json.loads(index.read_text())["_class_name"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{index} is not a diffusers model_index.json (no _class_name); "
                                 "save the pipeline again with save_pretrained") from None  # fmt: skip
            adapter_cls = adapter_for(class_name)
        elif str(source).startswith((".", "/", "~")) or os.sep + os.sep in str(source) or str(source).count("/") != 1:
            raise FileNotFoundError(f"pipeline directory not found: {source}")
        else:
            adapter_cls = None  # hub id: the class is known after loading
        from diffusers import DiffusionPipeline

        if dtype is not None:
            from_pretrained_kwargs["torch_dtype"] = dtype
        pipeline_type = adapter_cls.pipeline_type() if adapter_cls is not None else DiffusionPipeline
        try:
            with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype; older ones only know it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = pipeline_type.from_pretrained(str(source), **from_pretrained_kwargs)
        except OSError as err:
            raise _load_error(source, is_local=path.exists(), err=err) from err
        adapter = (adapter_cls or adapter_for(type(pipe).__name__))(pipe)
    if device is not None or dtype is not None:
        adapter.to(device=device, dtype=dtype)
    adapter.set_attention_backend(attention)
    return adapter


def _load_error(source: Any, *, is_local: bool, err: OSError) -> OSError:
    """What diffusers' OSError means for the user, in one line that names the pipeline and what to do."""
    text = " ".join(str(err).split())
    if not is_local and ("cache" in text or "offline" in text.lower() or "connect" in text.lower()):
        return FileNotFoundError(
            f"{source} is not a local pipeline directory and is not in the Hugging Face cache; download it with "
            f"`hf download {source}` (or allow network access: unset HF_HUB_OFFLINE), or give a local directory"
        )
    if "Unable to load weights" in text or "safetensors" in text.lower():
        return OSError(f"{text} The file is corrupt or truncated: save or download the pipeline again")
    return err


__all__ = [
    "ADAPTERS",
    "BACKENDS",
    "AttentionBackendError",
    "Conditioning",
    "DiffusionAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "InstructPix2PixAdapter",
    "Schedule",
    "ShapesAdapter",
    "ShapesEditAdapter",
    "ShapesEditPipeline",
    "ShapesPipeline",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "StepOutput",
    "UnsupportedPipelineError",
    "active_loras",
    "add_lora",
    "adapter_for",
    "available",
    "cond_batch_size",
    "ddim_step_with_logprob",
    "flow_cps_step_with_logprob",
    "flow_sde_step_with_logprob",
    "gaussian_log_prob",
    "has_lora",
    "load",
    "load_lora",
    "lora_disabled",
    "lora_names",
    "lora_parameters",
    "lora_state_restored",
    "register",
    "register_adapter",
    "save_lora",
    "set_active_lora",
    "unwrap_model",
]
