"""Typed training configs: dataclasses <- YAML recipe <- ``key=value`` overrides.

A recipe is a YAML file whose keys mirror a dataclass tree; command-line overrides use
dotted keys and YAML values (``optim.lr=3e-5``, ``refl.window=[30,39]``,
``reward={hpsv2.1: 1, clip: 0.5}``). Unknown keys and wrong types fail at load time with the
dotted key and the known alternatives, not in the middle of a run. The resolved config is
written next to the outputs (``to_yaml``) so a run can be reproduced from its directory.

The sections here are method-agnostic (model, LoRA, optimiser, loop, sampling, data,
validation). Every trainer's top-level config extends :class:`TrainingConfig` (the method,
the output directory, ``train.*``, ``optim.*``, ``validation.*``); trainers of diffusion
pipelines extend :class:`PipelineTrainingConfig`, and each method adds its own section.
Keys that were renamed fail with a one-line error naming the new key (``RENAMED_KEYS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
C = TypeVar("C", bound="TrainingConfig")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config schema."""


# ============================================================================ sections
@dataclass
class ModelConfig:
    """Which pipeline to train and how to place it."""

    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: the mixed-precision dtype for frozen weights
    scheduler: str | None = None  # swap the pipeline's scheduler ("ddim", "ddpm", "euler", "flow-euler")
    attention: str = "sdpa"


@dataclass
class LoraConfig:
    """LoRA on the denoiser (``pipelines.add_lora``); ``enabled: false`` is full fine-tuning."""

    enabled: bool = True
    rank: int = 8
    alpha: float | None = None  # default: rank (scale 1)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class OptimConfig:
    """AdamW and a diffusers LR schedule (``diffusers.optimization.get_scheduler`` names)."""

    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)


@dataclass
class FsdpConfig:
    """Sharding options under ``train.distributed: fsdp`` (see :mod:`imgalign.train.sharding`).

    Mixed precision is ``train.mixed_precision`` (bf16: blocks compute in bf16, gradients are
    reduced in fp32, the sharded master weights stay fp32).
    """

    reshard_after_forward: bool = True  # free gathered blocks after forward (re-gathered in backward): less memory
    cpu_offload: bool = False  # sharded weights, gradients and optimizer state live in host memory
    activation_checkpointing: bool = False  # recompute every sharded block in backward (parameter names unchanged)


@dataclass
class LoopConfig:
    """The training loop: steps, batches, precision, checkpoints, stability guards."""

    max_steps: int = 100
    batch_size: int = 1  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    gradient_checkpointing: bool = False
    vae_checkpointing: bool = False  # recompute the differentiable VAE decode in backward
    ema_decay: float | None = None  # keep an EMA of the trainable weights (saved output uses it)
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int | None = 3
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 1
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    distributed: Literal["ddp", "fsdp"] = "ddp"  # ddp: every process holds the whole model; fsdp: sharded (FSDP2)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)


@dataclass
class SamplingConfig:
    """How training samples are generated."""

    num_steps: int = 40
    guidance_scale: float | None = None  # None: the family's default in encode_prompt
    image_guidance_scale: float = 1.5  # edit models (InstructPix2Pix)
    detach_uncond: bool = False  # no gradient through the unconditional CFG branch
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


@dataclass
class DataConfig:
    """Prompts, or an images + captions folder (see ``imgalign.train.data``)."""

    prompts: list[str] | str | None = None  # a list, or a text file with one prompt per line
    images: str | None = None  # folder of images + captions (real images / edit sources)
    pretrain_images: str | None = None  # caption/image folder for a pre-training loss


@dataclass
class ValidationConfig:
    """Validation every ``every`` optimizer steps (and at step 0 and at the end)."""

    every: int = 0  # 0: only at the end


@dataclass
class ImageValidationConfig(ValidationConfig):
    """A fixed-seed image grid (and its reward) every ``every`` steps and at the end."""

    prompts: list[str] | None = None  # default: the first training prompts
    num_images: int = 4
    seed: int = 1234


# ============================================================================ top-level configs
@dataclass
class TrainingConfig:
    """What every trainer's config has (``imgalign train METHOD`` and ``imgalign train-reward``)."""

    method: str = ""  # the registry name; a recipe's ``method:`` must match the command's
    output_dir: str = "runs/train"
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


@dataclass
class PipelineTrainingConfig(TrainingConfig):
    """Trainers of a diffusion pipeline: which pipeline, reward and data, and how to sample."""

    pipeline: str = ""  # pipeline directory, hub id or a named pipeline ("shapes")
    reward: str | dict[str, float] = ""  # a registered reward, "a=1,b=0.5", or {name: weight}
    reward_options: dict[str, Any] = field(default_factory=dict)
    reward_device: str | None = None  # the reward's device (cuda:1: beside the generator's); None: the run's
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ImageValidationConfig = field(default_factory=ImageValidationConfig)


#: Keys that moved when every trainer adopted one vocabulary: ``old dotted key -> new``.
RENAMED_KEYS = {
    "run.output_dir": "output_dir",
    "run.seed": "train.seed",
    "run.mixed_precision": "train.mixed_precision",
    "run.cpu": "accelerate's --cpu (or CUDA_VISIBLE_DEVICES=)",
    "run.validate_every": "validation.every",
    "run.checkpoint_every": "train.checkpoint_every",
    "run.keep_checkpoints": "train.checkpoints_total_limit",
    "run.resume": "the --resume latest|PATH option",
    "run.eval_batch_size": "validation.batch_size",
    "optim.batch_size": "train.batch_size",
    "optim.grad_accum": "train.gradient_accumulation_steps",
    "optim.max_steps": "train.max_steps",
    "model.lora_rank": "lora.rank",
    "model.lora_alpha": "lora.alpha",
    "model.lora_targets": "lora.target_modules",
}


# ============================================================================ loading
def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking keys and value types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {_join(path, close[0])!r}?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown config key {_join(path, key)!r}{hint}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) and default is not dataclasses.MISSING:
            # A partial section keeps the config's own defaults for that section (a trainer may
            # default e.g. lora.target_modules or train.max_steps differently from the section class).
            value = {**dataclasses.asdict(default()), **value}
        kwargs[name] = _coerce(hints[name], value, _join(path, name))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{path} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, Sequence, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "refl.window=[30,39]"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (dotted keys, YAML values)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.problem})") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return nested


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not _is_leaf_mapping(key):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# Mappings that are *values* (replaced whole), not config sections merged key by key.
_LEAF_MAPPINGS = {"reward", "reward_options"}


def _is_leaf_mapping(key: str) -> bool:
    return key in _LEAF_MAPPINGS


#: The shipped recipes (``recipes/`` of the source tree, present in a clone or an editable install).
SHIPPED_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def resolve_recipe(path: str | Path) -> Path:
    """A recipe path as given, else the shipped recipe it names (``recipes/x.yaml`` or ``x.yaml`` or ``x``).

    So the README's ``--config recipes/shapes_verifier_dpo.yaml`` works from any working directory.
    """
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    name = path.name if path.parent in (Path("."), Path("recipes")) else None
    for candidate in ([SHIPPED_RECIPES / name, SHIPPED_RECIPES / f"{name}.yaml"] if name else []):
        if candidate.is_file():
            return candidate
    return path


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_recipe(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # one line: where and what, not the scanner's multi-line report
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (a YAML recipe is expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping at the top level")
    return data


def check_renamed_keys(data: Mapping[str, Any], renamed: Mapping[str, str] = RENAMED_KEYS) -> None:
    """A one-line error for a key that was renamed, naming the new one."""
    for old, new in renamed.items():
        node: Any = data
        for part in old.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"config key {old!r} was renamed: use {new}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), **fixed: Any) -> T:
    """Recipe file (optional) + overrides + fixed keys (e.g. the method from the command)."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    check_renamed_keys(data)
    for key, value in fixed.items():
        if key in data and data[key] != value:
            raise ConfigError(f"the recipe says {key}: {data[key]!r} but the command asks for {value!r}")
        data[key] = value
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
