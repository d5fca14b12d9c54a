"""The trainable reward: a base reward with the parts preference training changes, and its save format.

:func:`build_trainable` makes one of:

* ``mode="head"`` -- a head on frozen features. Families with their own head train it
  (ImageReward's ``mlp``, EditReward's ``rm_heads``); others get a new MLP over their
  features (CLIP-based rewards: image, text and their product; any reward with a
  ``features(images, prompts, **cond) -> Tensor[B, F]`` method).
* ``mode="lora"`` -- LoRA adapters (``peft.inject_adapter_in_model``) on the reward's linear
  layers (``lora_targets``; default: every ``nn.Linear`` outside ``nn.MultiheadAttention``,
  whose fused kernel would bypass the adapter), plus the head if there is one.
* ``mode="full"`` -- every parameter.
* ``mode="params"`` -- only parameters whose names start with one of ``trainable``
  ("any Reward whose parameters you mark trainable"); ``trainable`` also adds to other modes.

Losses come from :mod:`rewards.preference` (:func:`pair_loss` applies the configured one);
uncertainty-aware losses (``"uncertainty"``, ``"thurstone"``) need ``(mu, log_sigma)``
outputs: EditReward has them, a new head gets them with ``outputs="uncertainty"``. Aspects
(``aspects=[...]``) give the head one output per aspect, trained on per-aspect labels; the
reward's score is their mean.

The training loop is not here (a leaf package does not run trainers): ``imgalign
train-reward`` runs it on imgalign's training skeleton. Its output directory holds
``reward.json`` + ``model.safetensors`` (only the trained tensors) and loads with
``rewards.load(path)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import preference as P
from .base import Reward, RewardInfo
from .data import base_dir as dataset_base_dir
from .data import find_key, load_image_value, read_records

__all__ = [
    "LossConfig", "PairDataConfig", "RewardModelConfig", "TrainableReward", "build_trainable", "collate_pairs",
    "evaluate_pairs", "load_pairs", "load_trained_reward", "pair_loss", "save_trained_reward",
]


# -- config -----------------------------------------------------------------------------------
@dataclass
class PairDataConfig:
    """Where the preference pairs are and how to read them (``data.*`` of ``imgalign train-reward``)."""

    train: str = ""
    val: str | None = None
    val_fraction: float = 0.1  # held out from ``train`` when ``val`` is not given
    image_size: int = 224  # images are resized to a square this size so pairs batch together
    image_a_key: str | None = None
    image_b_key: str | None = None
    label_key: str | None = None
    prompt_key: str | None = None
    source_key: str | None = None
    skip_bad_rows: bool = False  # drop bad pairs (listed in one warning) instead of failing on them


@dataclass
class RewardModelConfig:
    """Which reward to train and which of its parts (``model.*``; LoRA sizes come separately)."""

    reward: dict[str, Any] = field(default_factory=dict)  # {"name": ..., "options": {...}}
    mode: Literal["head", "lora", "full", "params"] = "head"
    trainable: list[str] = field(default_factory=list)
    new_head: bool | None = None  # default: in "head" mode when the family has no head of its own
    head_hidden: int = 128
    outputs: Literal["score", "uncertainty"] = "score"
    aspects: list[str] = field(default_factory=list)


@dataclass
class LossConfig:
    """The preference loss (:func:`rewards.preference.preference_loss` names and options)."""

    kind: Literal["bt", "margin", "rao-kupper", "davidson", "uncertainty", "thurstone"] = "bt"
    margin: float = P.EDITREWARD_MARGIN
    theta: float = 2.0
    nu: float = 1.0
    estimator: Literal["gauss-hermite", "monte-carlo"] = "gauss-hermite"
    num_samples: int = 1000
    num_points: int = 32
    aspect_weights: list[float] = field(default_factory=list)
    overall_weight: float = 1.0


# -- the trainable reward ---------------------------------------------------------------------
# Families whose released model already ends in a head (attribute prefixes, by class name so
# that this module does not import them).
OWN_HEADS = {"ImageRewardReward": ("model.mlp.",), "EditRewardReward": ("model.rm_heads.",)}


def _features(base: Reward, images: Tensor, prompts, cond: dict) -> Tensor:
    if hasattr(base, "features"):
        return base.features(images, prompts, **cond)
    if type(base).__name__ == "ClipScore":
        image = base.encoder.encode_image(images)
        text = base.encoder.encode_text(prompts)
        return torch.cat([image, text, image * text], dim=-1)
    raise ValueError(f"a new head needs features: {type(base).__name__} has no features() method "
                     f"(use mode=lora/full/params, or give the reward a features(images, prompts, **cond) method)")


class TrainableReward(Reward):
    """A base reward, optionally a new head, LoRA adapters; outputs ``[B, aspects, 1 or 2]``."""

    def __init__(self, base: Reward, new_head: bool, outputs: str = "score", aspects: Sequence[str] = (),
                 head_hidden: int = 128, feature_dim: int | None = None):
        super().__init__()
        self.base = base
        self.outputs_kind = outputs
        self.aspects = list(aspects)
        self.per_output = 2 if outputs == "uncertainty" else 1
        self.head: nn.Module | None = None
        if new_head:
            if feature_dim is None:
                raise ValueError("feature_dim is needed for a new head")
            width = max(1, len(self.aspects)) * self.per_output
            self.head = nn.Sequential(nn.Linear(feature_dim, head_hidden), nn.GELU(), nn.Linear(head_hidden, width))
        self.info = RewardInfo(name=f"trained({base.info.name})", inputs=base.info.inputs,
                               differentiable=base.info.differentiable,
                               source=f"imgalign train-reward over {base.info.name}")

    def outputs(self, images: Tensor, prompts, **cond) -> Tensor:
        """``[B, A, P]``: A aspects (1 without), P = 1 (score) or 2 (mu, log_sigma)."""
        images, texts, cond = self.validate(images, prompts, **cond)
        batch = images.shape[0]
        if self.head is not None:
            out = self.head(_features(self.base, images, texts, cond).float())
            return out.view(batch, max(1, len(self.aspects)), self.per_output)
        if type(self.base).__name__ == "EditRewardReward":
            out = self.base.head_outputs(images, texts, cond["source_images"]).float()  # [B, heads, 2]
            return out if self.per_output == 2 else out[..., :1]
        if self.per_output == 2:
            raise ValueError(f"outputs='uncertainty' needs a new head or EditReward; {type(self.base).__name__} "
                             f"returns one score")
        return self.base._score(images, texts, **cond).float().view(batch, 1, 1)

    def _score(self, images: Tensor, prompts, **cond) -> Tensor:
        return self.outputs(images, prompts, **cond)[..., 0].mean(1)


def _linear_targets(module: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    mha_children = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.MultiheadAttention):
            mha_children.update(f"{name}.{child}" if name else child for child, _ in sub.named_children())
    return [name for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and name not in mha_children and not name.startswith(tuple(exclude))]


def build_trainable(cfg: RewardModelConfig, load: Callable[..., Reward] | None = None, *, lora_rank: int = 8,
                    lora_alpha: float = 8.0, lora_targets: Sequence[str] = ()) -> TrainableReward:  # fmt: skip
    """The base reward from ``cfg.reward`` with the parts ``cfg.mode`` trains (see module doc).

    ``lora_*`` size the adapters of ``mode="lora"``. The returned model remembers what built it
    (``build_options``), which :func:`save_trained_reward` writes next to the weights.
    """
    if load is None:
        from .registry import load
    if not cfg.reward or "name" not in cfg.reward:
        raise ValueError("model.reward must be {name: ..., options: {...}} naming the reward to train")
    base = load(cfg.reward["name"], **dict(cfg.reward.get("options") or {}))
    if isinstance(base, TrainableReward):  # continue training a trained reward
        base = base.base
    family = type(base).__name__
    own_head = OWN_HEADS.get(family)
    new_head = cfg.new_head if cfg.new_head is not None else (cfg.mode == "head" and own_head is None)
    feature_dim = None
    if new_head:
        probe = torch.rand(1, 3, 64, 64, device=base.device)
        cond = {k: probe for k in ("source_images", "reference_images") if k in base.info.inputs}
        with torch.no_grad():
            feature_dim = _features(base, probe, ["probe"] if base.info.needs_prompts else None, cond).shape[-1]
    model = TrainableReward(base, new_head, cfg.outputs, cfg.aspects, cfg.head_hidden, feature_dim)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        exclude = own_head or ()
        targets = list(lora_targets) or _linear_targets(base, exclude)
        if not targets:
            raise ValueError(f"no linear layers to put LoRA on in {family}; set model.lora_targets")
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets),
                                base)
        for name, p in base.named_parameters():
            p.requires_grad_("lora_" in name)
    prefixes = list(cfg.trainable)
    if cfg.mode in ("head", "lora") and own_head and not new_head:
        prefixes += list(own_head)
    for name, p in base.named_parameters():
        if cfg.mode == "full" or name.startswith(tuple(prefixes)):
            p.requires_grad_(True)
    if model.head is not None:
        for p in model.head.parameters():
            p.requires_grad_(True)
    if cfg.mode == "head" and own_head is None and not new_head and not prefixes:
        raise ValueError(f"mode=head: {family} has no head of its own; set model.new_head=true or list model.trainable")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing to train: mode={cfg.mode!r} with trainable={cfg.trainable} selects no parameter of {family}")
    model.build_options = {"base": cfg.reward, "mode": cfg.mode, "trainable": list(cfg.trainable),
                           "new_head": new_head, "head_hidden": cfg.head_hidden, "outputs": cfg.outputs,
                           "aspects": list(cfg.aspects), "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                           "lora_targets": list(lora_targets)}  # fmt: skip
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors training changed: trainable parameters (all of them in ``full`` mode)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place (POSIX-atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the saved reward gets the umask's ordinary permissions, not 0700
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        write(tmp)
        _ordinary_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def save_trained_reward(model: TrainableReward, directory: str | os.PathLike) -> Path:
    """``reward.json`` + ``model.safetensors``: loadable with ``rewards.load(directory)``."""
    from safetensors.torch import save_file

    state = trainable_state(model)
    options = {**model.build_options, "weights": "./model.safetensors"}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "reward.json").write_text(json.dumps({"name": "trained-reward", "options": options}, indent=2) + "\n")

    target = Path(directory)
    _atomic_dir(target, write)
    return target


def load_trained_reward(base: dict, weights: str, mode: str = "head", trainable: Sequence[str] = (),
                        new_head: bool | None = None, head_hidden: int = 128, outputs: str = "score",
                        aspects: Sequence[str] = (), lora_rank: int = 8, lora_alpha: float = 8.0,
                        lora_targets: Sequence[str] = ()) -> TrainableReward:
    """Rebuild the trained structure over the base reward and load the trained tensors (safetensors)."""
    from .loading import load_state_dict

    cfg = RewardModelConfig(reward=base, mode=mode, trainable=list(trainable), new_head=new_head,
                            head_hidden=head_hidden, outputs=outputs, aspects=list(aspects))
    model = build_trainable(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
    state = load_state_dict(weights)
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{weights} does not match the trained reward: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# -- data ----------------------------------------------------------------------------------------
# Field names looked up in this order. Pick-a-Pic v1/v2 (``yuvalkirstain/pickapic_v2``) name
# them ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (1: image 0 preferred, 0: image 1, 0.5: a
# tie; ``label_1 = 1 - label_0`` adds nothing); ``label_0`` is read as P(image 0 better).
IMAGE_A_KEYS = ("image_a", "image_0", "chosen_image", "image_left", "path_a", "jpg_0")
IMAGE_B_KEYS = ("image_b", "image_1", "rejected_image", "image_right", "path_b", "jpg_1")
LABEL_KEYS = ("label", "preference", "winner", "ranking", "label_0")
PROMPT_KEYS = ("prompt", "instruction", "caption", "text")
SOURCE_KEYS = ("source_image", "source", "input_image", "src_image")

#: The smallest image side (pixels) a pair may have. Anything smaller is a placeholder or a
#: broken export, not a picture anyone judged: 8 px is one latent cell of an 8x VAE.
MIN_IMAGE_SIDE = 8
#: Two images of a pair whose aspect ratios differ by more than this (relative) are a "wrong
#: size" row: both are resized to one square, so they would be distorted differently and the
#: distortion would become part of what the preference teaches. A pure difference in scale is
#: fine (Pick-a-Pic holds both 512^2 and 768^2 generations).
ASPECT_TOLERANCE = 0.01
#: Bad rows listed by number in the error / warning; the rest are counted.
MAX_LISTED_BAD_ROWS = 10


@dataclass
class Pair:
    image_a: Tensor  # [3, S, S]
    image_b: Tensor
    prompt: str | None
    source: Tensor | None
    target: float  # P(A preferred): 1, 0 or 0.5
    aspect_targets: list[float]  # NaN where unlabelled


class BadRow(ValueError):
    """One record that cannot be a training pair; the message is a short reason (no row number)."""


def _resize(image: Tensor, size: int) -> Tensor:
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)[0]


def _describe(value) -> str:
    """A short, one-line name for an image field's value (a path, a byte count, a struct)."""
    if isinstance(value, dict):  # the Hugging Face Image struct: the path names it, the bytes are what is read
        data, name = value.get("bytes"), value.get("path")
        if name and data:
            return f"{_describe(name)} ({len(bytes(data))} bytes)"
        value = name or data
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"({len(bytes(value))} bytes)"
    if isinstance(value, str) and value.startswith("data:"):
        return "(a data: URL)"
    text = repr(str(value)) if isinstance(value, (str, os.PathLike)) else type(value).__name__
    return text if len(text) <= 80 else text[:38] + "..." + text[-38:]


def _read_image(record: dict, key: str, base_dir: Path) -> Tensor:
    """``record[key]`` decoded to ``[1, 3, H, W]``, or :class:`BadRow` saying what is wrong with it."""
    value = record.get(key)
    if value is None or (isinstance(value, (str, bytes)) and not value):
        raise BadRow(f"no {key}")
    try:
        image = load_image_value(value, base_dir)
    except FileNotFoundError:
        raise BadRow(f"{key} {_describe(value)} not found") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"; say which
        from PIL import UnidentifiedImageError

        why = "not an image format PIL reads" if isinstance(err, UnidentifiedImageError) else " ".join(str(err).split())[:80]
        raise BadRow(f"{key} {_describe(value)} does not decode ({why})") from None
    h, w = image.shape[-2:]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise BadRow(f"{key} is {w}x{h} px (smaller than {MIN_IMAGE_SIDE} px)")
    return image


def _read_label(value, what: str = "label") -> float:
    """A label as P(A better); ``None``/NaN is unlabelled (NaN), anything unreadable a :class:`BadRow`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    try:
        return P.label_to_target(value)
    except ValueError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise BadRow(f"unknown {what} {shown}") from None


def _read_pair(record: dict, keys: dict[str, str | None], base_dir: Path, size: int, aspects: Sequence[str]) -> Pair:
    """One record as a :class:`Pair`; every problem of the record in one :class:`BadRow`."""
    problems: list[str] = []
    images: dict[str, Tensor] = {}
    for side in ("a", "b", "source"):
        key = keys[side]
        if key is None or (side == "source" and record.get(key) is None):
            continue
        try:
            images[side] = _read_image(record, key, base_dir)
        except BadRow as err:
            problems.append(str(err))
    if "a" in images and "b" in images:
        (ha, wa), (hb, wb) = images["a"].shape[-2:], images["b"].shape[-2:]
        if abs((wa / ha) / (wb / hb) - 1) > ASPECT_TOLERANCE:
            problems.append(f"{keys['a']} is {wa}x{ha} but {keys['b']} is {wb}x{hb} (different shapes)")
    target = math.nan
    if keys["label"]:
        try:
            target = _read_label(record.get(keys["label"]))
        except BadRow as err:
            problems.append(str(err))
    labels = record.get("labels") or {}
    aspect_targets = []
    for aspect in aspects:
        try:
            aspect_targets.append(_read_label(labels.get(aspect) if isinstance(labels, dict) else None,
                                              f"{aspect} label"))
        except BadRow as err:
            problems.append(str(err))
    if problems:
        raise BadRow(", ".join(problems))
    prompt = record.get(keys["prompt"]) if keys["prompt"] else None
    source = images.get("source")
    return Pair(image_a=_resize(images["a"], size), image_b=_resize(images["b"], size), prompt=prompt,
                source=_resize(source, size) if source is not None else None, target=target,
                aspect_targets=aspect_targets)  # fmt: skip


def _bad_rows_listing(bad: list[tuple[int, str]]) -> str:
    listed = "; ".join(f"row {number}: {reason}" for number, reason in bad[:MAX_LISTED_BAD_ROWS])
    more = len(bad) - MAX_LISTED_BAD_ROWS
    return listed + (f"; and {more} more" if more > 0 else "")


def load_pairs(path: str, cfg: PairDataConfig, aspects: Sequence[str] = ()) -> list[Pair]:
    """Preference pairs from a dataset file; images loaded and resized to ``cfg.image_size``.

    Record fields: ``image_a``/``image_b`` (path, bytes or ``{"bytes","path"}``), ``prompt``
    (or ``instruction``), optional ``source_image`` (edits), ``label`` ("A"/"B"/"tie" or a
    probability that A is better) and, with aspects, ``labels: {aspect: label}``. Pick-a-Pic's
    own columns (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) are recognised too; a missing
    label (``None``) is an unlabelled pair (target NaN).

    Every record is checked before anything trains. A *bad row* has a missing or unreadable
    image (no field, file not found, bytes that do not decode), an unknown label, or a wrong
    size (a side shorter than :data:`MIN_IMAGE_SIDE` px, or the two images of the pair of
    different aspect ratios, see :data:`ASPECT_TOLERANCE`). Bad rows raise one ``ValueError``
    listing them by record number (1-based, in file order); with ``cfg.skip_bad_rows`` they
    are dropped and listed in one warning instead.
    """
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no preference pairs")
    # every field any record has (JSONL records may differ), in first-seen order
    fields = dict.fromkeys(key for record in records for key in record)
    keys = {
        "a": find_key(fields, cfg.image_a_key, IMAGE_A_KEYS, "image A"),
        "b": find_key(fields, cfg.image_b_key, IMAGE_B_KEYS, "image B"),
        "label": find_key(fields, cfg.label_key, LABEL_KEYS, "label", required=not aspects),
        "prompt": find_key(fields, cfg.prompt_key, PROMPT_KEYS, "prompt", required=False),
        "source": find_key(fields, cfg.source_key, SOURCE_KEYS, "source image", required=False),
    }
    base_dir = dataset_base_dir(path)
    pairs: list[Pair] = []
    bad: list[tuple[int, str]] = []
    for number, record in enumerate(records, 1):
        try:
            pairs.append(_read_pair(record, keys, base_dir, cfg.image_size, aspects))
        except BadRow as err:
            bad.append((number, str(err)))
    if not bad:
        return pairs
    count = f"{len(bad)} bad row{'s' if len(bad) != 1 else ''} of {len(records)}"
    if not cfg.skip_bad_rows:
        raise ValueError(f"{path}: {count} (set data.skip_bad_rows=true to train without them): {_bad_rows_listing(bad)}")
    if not pairs:
        raise ValueError(f"{path}: every row is bad ({count}): {_bad_rows_listing(bad)}")
    warnings.warn(f"{path}: skipped {count} (data.skip_bad_rows=true): {_bad_rows_listing(bad)}", stacklevel=2)
    return pairs


def collate_pairs(pairs: Sequence[Pair], device) -> dict[str, Any]:
    """A batch of pairs as A-then-B images (one forward for both sides), prompts, sources and targets."""
    images = torch.cat([torch.stack([p.image_a for p in pairs]), torch.stack([p.image_b for p in pairs])]).to(device)
    prompts = [p.prompt or "" for p in pairs] * 2
    cond = {}
    if pairs[0].source is not None:
        src = torch.stack([p.source for p in pairs])
        cond["source_images"] = torch.cat([src, src]).to(device)
    return {"images": images, "prompts": prompts, "cond": cond,
            "target": torch.tensor([p.target for p in pairs], device=device),
            "aspect_targets": torch.tensor([p.aspect_targets for p in pairs], device=device).view(len(pairs), -1)}


# -- loss and validation -----------------------------------------------------------------------
def pair_loss(out: Tensor, batch: dict, cfg: LossConfig, generator: torch.Generator | None = None) -> Tensor:
    """The configured preference loss of a :func:`collate_pairs` batch's outputs ``[2B, A, P]``."""
    half = out.shape[0] // 2
    out_a, out_b = out[:half], out[half:]
    if out.shape[-1] == 1:
        out_a, out_b = out_a[..., 0], out_b[..., 0]
    options = dict(margin=cfg.margin, theta=cfg.theta, nu=cfg.nu, estimator=cfg.estimator,
                   num_samples=cfg.num_samples, num_points=cfg.num_points, generator=generator)
    aspects = batch["aspect_targets"]
    if aspects.shape[1] and out.shape[1] == aspects.shape[1]:
        target = batch["target"]
        overall = None if bool(torch.isnan(target).all()) else torch.nan_to_num(target, nan=0.5)
        weights = cfg.aspect_weights or None
        return P.multi_aspect_loss(cfg.kind, out_a, out_b, aspects, overall, weights, cfg.overall_weight,
                                   **options)["loss"]
    # no aspects: the aggregate (mean over heads) against the overall label
    return P.preference_loss(cfg.kind, out_a.mean(1), out_b.mean(1), batch["target"], **options)


@torch.no_grad()
def evaluate_pairs(model: TrainableReward, pairs: Sequence[Pair], batch_size: int, device) -> dict[str, float]:
    """Scores of both sides -> accuracy without ties, accuracy with ties, mean BT probability of the label."""
    from .evaluation import accuracy_with_ties, pairwise_accuracy

    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], device)
        prompts = batch["prompts"] if model.info.needs_prompts else None
        scores = model.outputs(batch["images"], prompts, **batch["cond"])[..., 0].mean(1)
        half = scores.shape[0] // 2
        margins.append((scores[:half] - scores[half:]).float().cpu())
    m = torch.cat(margins)
    h = torch.tensor([0 if p.target == 0.5 else (1 if p.target > 0.5 else -1) for p in pairs])
    acc_ties, eps = accuracy_with_ties(h.tolist(), m.tolist())
    return {"accuracy": pairwise_accuracy(h.tolist(), m.tolist()), "accuracy_with_ties": acc_ties,
            "tie_epsilon": eps, "pairs": len(pairs)}
