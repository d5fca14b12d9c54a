"""Reward-model training on preference pairs, and the reward it produces.

``train_reward(config)`` trains one of:

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

Losses come from :mod:`rewards.preference`; uncertainty-aware losses (``"uncertainty"``,
``"thurstone"``) need ``(mu, log_sigma)`` outputs: EditReward has them, a new head gets
them with ``outputs="uncertainty"``. Aspects (``aspects=[...]``) give the head one output
per aspect, trained on per-aspect labels; the reward's score is their mean.

The loop runs on ``accelerate`` (several processes, mixed precision, gradient
accumulation); the data order is a pure function of ``(seed, step)`` and the trainable
state, optimizer state and step are checkpointed atomically, so a resumed run continues
exactly. The output directory holds ``reward.json`` + ``model.safetensors`` (only the trained
tensors) and loads with ``rewards.load(path)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "RewardTrainingConfig", "RunConfig",
    "TrainableReward", "build_trainable", "load_pairs", "load_trained_reward", "save_trained_reward", "train_reward",
]


# -- config -----------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: str = ""
    val: str | None = None
    val_fraction: float = 0.1  # held out from ``train`` when ``val`` is not given
    image_size: int = 224  # images are resized to a square this size so pairs batch together
    image_a_key: str | None = None
    image_b_key: str | None = None
    label_key: str | None = None
    prompt_key: str | None = None
    source_key: str | None = None


@dataclass
class ModelConfig:
    reward: dict[str, Any] = field(default_factory=dict)  # {"name": ..., "options": {...}}
    mode: Literal["head", "lora", "full", "params"] = "head"
    trainable: list[str] = field(default_factory=list)
    new_head: bool | None = None  # default: in "head" mode when the family has no head of its own
    head_hidden: int = 128
    outputs: Literal["score", "uncertainty"] = "score"
    aspects: list[str] = field(default_factory=list)
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: list[str] = field(default_factory=list)


@dataclass
class LossConfig:
    kind: Literal["bt", "margin", "rao-kupper", "davidson", "uncertainty", "thurstone"] = "bt"
    margin: float = P.EDITREWARD_MARGIN
    theta: float = 2.0
    nu: float = 1.0
    estimator: Literal["gauss-hermite", "monte-carlo"] = "gauss-hermite"
    num_samples: int = 1000
    num_points: int = 32
    aspect_weights: list[float] = field(default_factory=list)
    overall_weight: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 16  # pairs per process per micro-step
    grad_accum: int = 1
    max_steps: int = 200
    max_grad_norm: float = 1.0


@dataclass
class RunConfig:
    output_dir: str = "runs/reward"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    validate_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto" (latest checkpoint if any), "none", or a checkpoint directory
    eval_batch_size: int = 32


@dataclass
class RewardTrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


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


def build_trainable(cfg: ModelConfig, load: Callable[..., Reward] | None = None) -> TrainableReward:
    """The base reward from ``cfg.reward`` with the parts ``cfg.mode`` trains (see module doc)."""
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
        targets = list(cfg.lora_targets) or _linear_targets(base, exclude)
        if not targets:
            raise ValueError(f"no linear layers to put LoRA on in {family}; set model.lora_targets")
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=targets),
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
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors training changed: trainable parameters (all of them in ``full`` mode)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in names}


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place (POSIX-atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp.", dir=target.parent))
    try:
        write(tmp)
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


def save_trained_reward(model: TrainableReward, cfg: ModelConfig, directory: str | os.PathLike) -> Path:
    """``reward.json`` + ``model.safetensors``: loadable with ``rewards.load(directory)``."""
    from safetensors.torch import save_file

    state = trainable_state(model)
    options = {"base": cfg.reward, "mode": cfg.mode, "trainable": cfg.trainable,
               "new_head": model.head is not None, "head_hidden": cfg.head_hidden, "outputs": cfg.outputs,
               "aspects": cfg.aspects, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
               "lora_targets": cfg.lora_targets, "weights": "./model.safetensors"}

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

    cfg = ModelConfig(reward=base, mode=mode, trainable=list(trainable), new_head=new_head, head_hidden=head_hidden,
                      outputs=outputs, aspects=list(aspects), lora_rank=lora_rank, lora_alpha=lora_alpha,
                      lora_targets=list(lora_targets))
    model = build_trainable(cfg)
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
IMAGE_A_KEYS = ("image_a", "image_0", "chosen_image", "image_left", "path_a")
IMAGE_B_KEYS = ("image_b", "image_1", "rejected_image", "image_right", "path_b")
LABEL_KEYS = ("label", "preference", "winner", "ranking")
PROMPT_KEYS = ("prompt", "instruction", "caption", "text")
SOURCE_KEYS = ("source_image", "source", "input_image", "src_image")


@dataclass
class Pair:
    image_a: Tensor  # [3, S, S]
    image_b: Tensor
    prompt: str | None
    source: Tensor | None
    target: float  # P(A preferred): 1, 0 or 0.5
    aspect_targets: list[float]  # NaN where unlabelled


def _resize(image: Tensor, size: int) -> Tensor:
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)[0]


def load_pairs(path: str, cfg: DataConfig, aspects: Sequence[str] = ()) -> list[Pair]:
    """Preference pairs from a dataset file; images loaded and resized to ``cfg.image_size``.

    Record fields: ``image_a``/``image_b`` (path, bytes or ``{"bytes","path"}``), ``prompt``
    (or ``instruction``), optional ``source_image`` (edits), ``label`` ("A"/"B"/"tie" or a
    probability that A is better) and, with aspects, ``labels: {aspect: label}``.
    """
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no preference pairs")
    first = records[0]
    key_a = find_key(first, cfg.image_a_key, IMAGE_A_KEYS, "image A")
    key_b = find_key(first, cfg.image_b_key, IMAGE_B_KEYS, "image B")
    key_label = find_key(first, cfg.label_key, LABEL_KEYS, "label", required=not aspects)
    key_prompt = find_key(first, cfg.prompt_key, PROMPT_KEYS, "prompt", required=False)
    key_source = find_key(first, cfg.source_key, SOURCE_KEYS, "source image", required=False)
    base_dir = dataset_base_dir(path)
    pairs = []
    for number, record in enumerate(records, 1):
        try:
            # a missing label is None in Parquet / datasets rows (every row has every column)
            target = P.label_to_target(record[key_label]) if key_label and record.get(key_label) is not None else math.nan
            labels = record.get("labels") or {}
            aspect_targets = [P.label_to_target(labels[a]) if labels.get(a) is not None else math.nan for a in aspects]
            source = record.get(key_source) if key_source else None
            pairs.append(Pair(
                image_a=_resize(load_image_value(record[key_a], base_dir), cfg.image_size),
                image_b=_resize(load_image_value(record[key_b], base_dir), cfg.image_size),
                prompt=record.get(key_prompt) if key_prompt else None,
                source=_resize(load_image_value(source, base_dir), cfg.image_size) if source is not None else None,
                target=target, aspect_targets=aspect_targets))
        except (KeyError, ValueError, OSError) as err:
            raise ValueError(f"{path}: record {number}: {type(err).__name__}: {err}") from None
    return pairs


def _collate(pairs: Sequence[Pair], device) -> dict[str, Any]:
    images = torch.cat([torch.stack([p.image_a for p in pairs]), torch.stack([p.image_b for p in pairs])]).to(device)
    prompts = [p.prompt or "" for p in pairs] * 2
    cond = {}
    if pairs[0].source is not None:
        src = torch.stack([p.source for p in pairs])
        cond["source_images"] = torch.cat([src, src]).to(device)
    return {"images": images, "prompts": prompts, "cond": cond,
            "target": torch.tensor([p.target for p in pairs], device=device),
            "aspect_targets": torch.tensor([p.aspect_targets for p in pairs], device=device).view(len(pairs), -1)}


def _batch_positions(step: int, micro: int, cfg: OptimConfig, world: int, rank: int, n: int, seed: int) -> list[int]:
    """Dataset indices of this process's micro-batch: a pure function of the step (exact resume)."""
    global_batch = cfg.batch_size * world
    start = ((step * cfg.grad_accum + micro) * global_batch) + rank * cfg.batch_size
    indices = []
    for position in range(start, start + cfg.batch_size):
        epoch, offset = divmod(position, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices.append(int(torch.randperm(n, generator=g)[offset]))
    return indices


# -- loss and validation -----------------------------------------------------------------------
class _PairObjective(nn.Module):
    """What DDP wraps: the trained reward's raw outputs for a batch of A-then-B images."""

    def __init__(self, model: TrainableReward):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, prompts, cond: dict) -> Tensor:
        prompts = prompts if self.model.info.needs_prompts else None
        return self.model.outputs(images, prompts, **cond)


def pair_loss(out: Tensor, batch: dict, cfg: LossConfig, generator: torch.Generator | None = None) -> Tensor:
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
        batch = _collate(pairs[start:start + batch_size], device)
        prompts = batch["prompts"] if model.info.needs_prompts else None
        scores = model.outputs(batch["images"], prompts, **batch["cond"])[..., 0].mean(1)
        half = scores.shape[0] // 2
        margins.append((scores[:half] - scores[half:]).float().cpu())
    m = torch.cat(margins)
    h = torch.tensor([0 if p.target == 0.5 else (1 if p.target > 0.5 else -1) for p in pairs])
    acc_ties, eps = accuracy_with_ties(h.tolist(), m.tolist())
    return {"accuracy": pairwise_accuracy(h.tolist(), m.tolist()), "accuracy_with_ties": acc_ties,
            "tie_epsilon": eps, "pairs": len(pairs)}


# -- checkpoints ---------------------------------------------------------------------------------
def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(run_dir: Path, step: int, model: TrainableReward, optimizer, keep: int) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")

    _atomic_dir(run_dir / "checkpoints" / f"step-{step:07d}", write)
    for old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: TrainableReward, optimizer) -> int:
    from .loading import load_state_dict

    state = load_state_dict(path / "trainable.safetensors")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not match the model: unexpected {result.unexpected_keys[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


# -- the loop ------------------------------------------------------------------------------------
def train_reward(cfg: RewardTrainingConfig, log: Callable[[str], None] = print) -> Path:
    """Train, validate, checkpoint; returns the directory of the trained reward (``<output_dir>/reward``)."""
    from accelerate import Accelerator
    from tqdm import tqdm

    accelerator = Accelerator(mixed_precision=cfg.run.mixed_precision, cpu=cfg.run.cpu)
    run_dir = Path(cfg.run.output_dir)
    is_main = accelerator.is_main_process
    torch.manual_seed(cfg.run.seed)  # a new head's initialisation
    model = build_trainable(cfg.model).to(accelerator.device)
    aspects = cfg.model.aspects
    if not cfg.data.train:
        raise ValueError("data.train must name the training pairs (JSONL, Parquet or a datasets directory)")
    pairs = load_pairs(cfg.data.train, cfg.data, aspects)
    if cfg.data.val:
        val_pairs = load_pairs(cfg.data.val, cfg.data, aspects)
    else:  # a fixed held-out split of the training file
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
        n_val = int(round(cfg.data.val_fraction * len(pairs)))
        val_pairs = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in order[n_val:]]
    if not pairs:
        raise ValueError("no training pairs left after the validation split")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warmup = max(0, cfg.optim.warmup_steps)

    def learning_rate(step: int) -> float:  # a function of the step alone, so resuming needs no scheduler state
        return cfg.optim.lr * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    start_step = 0
    resume = None
    if cfg.run.resume == "auto":
        found = _checkpoints(run_dir)
        resume = found[-1] if found else None
    elif cfg.run.resume not in ("none", ""):
        resume = Path(cfg.run.resume)
        if not (resume / "state.json").is_file():
            raise FileNotFoundError(f"run.resume: {resume} is not a checkpoint directory (no state.json)")
    if resume is not None:
        start_step = _load_checkpoint(resume, model, optimizer)
        log(f"resumed from {resume} at step {start_step}")

    objective, optimizer = accelerator.prepare(_PairObjective(model), optimizer)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_file = run_dir / "metrics.jsonl"
    rank, world = accelerator.process_index, accelerator.num_processes
    last_metrics: dict[str, Any] = {}
    bar = tqdm(range(start_step, cfg.optim.max_steps), initial=start_step, total=cfg.optim.max_steps,
               desc="train-reward", disable=not is_main)
    for step in bar:
        t0 = time.perf_counter()
        # SAMPLE: this process's share of the global batch, a function of (seed, step)
        total_loss = 0.0
        for micro in range(cfg.optim.grad_accum):
            idx = _batch_positions(step, micro, cfg.optim, world, rank, len(pairs), cfg.run.seed)
            batch = _collate([pairs[i] for i in idx], accelerator.device)
            generator = torch.Generator(device="cpu").manual_seed(cfg.run.seed * 7919 + step * 31 + micro * 7 + rank)
            # SCORE + LOSS
            sync = micro == cfg.optim.grad_accum - 1
            ctx = accelerator.no_sync(objective) if not sync and world > 1 else _nullcontext()
            with ctx, accelerator.autocast():
                out = objective(batch["images"], batch["prompts"], batch["cond"])
                loss = pair_loss(out.float(), batch, cfg.loss, generator) / cfg.optim.grad_accum
            accelerator.backward(loss)
            total_loss += float(loss.detach())
        # UPDATE
        if cfg.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        lr = learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record: dict[str, Any] = {"step": done, "loss": total_loss, "lr": lr,
                                  "step_s": time.perf_counter() - t0}
        if val_pairs and (done % cfg.run.validate_every == 0 or done == cfg.optim.max_steps):
            if is_main:
                last_metrics = {f"val_{k}": v for k, v in evaluate_pairs(
                    model, val_pairs, cfg.run.eval_batch_size, accelerator.device).items()}
                record.update(last_metrics)
                log(f"step {done}: loss {total_loss:.4f} val accuracy {last_metrics['val_accuracy']:.4f} "
                    f"(with ties {last_metrics['val_accuracy_with_ties']:.4f})")
            accelerator.wait_for_everyone()
        if is_main:
            with metrics_file.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{total_loss:.4f}")
        if done % cfg.run.checkpoint_every == 0 or done == cfg.optim.max_steps:
            if is_main:
                _save_checkpoint(run_dir, done, model, optimizer.optimizer, cfg.run.keep_checkpoints)
            accelerator.wait_for_everyone()
    out_dir = run_dir / "reward"
    if is_main:
        save_trained_reward(model, cfg.model, out_dir)
        (run_dir / "final_metrics.json").write_text(json.dumps(last_metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return out_dir


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
