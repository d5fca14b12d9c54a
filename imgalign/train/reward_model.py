"""Reward-model training on preference pairs (``imgalign train-reward``, ``imgalign train reward``).

The model and its save format are :mod:`rewards.training`'s (:class:`~rewards.training.TrainableReward`:
a head, LoRA or full fine-tuning over any reward); this recipe is its loop on the run
skeleton, read top to bottom::

    setup   the trainable reward, the pairs (and a held-out split), a step-addressed sampler
    step    SAMPLE  this process's pairs for the micro-step
            SCORE   both sides in one forward pass: outputs [2B, aspects, 1 or 2]
            LOSS    the configured preference loss (Bradley-Terry, ties, margin, uncertainty)
    outputs validation accuracy (with ties) every ``validation.every`` steps; the trained
            reward in ``<output_dir>/reward`` (``rewards.load(path)``) and ``final_metrics.json``

Config: ``data.*`` (the pairs), ``model.*`` (what to train), ``lora.*`` (adapter sizes for
``model.mode=lora``), ``loss.*``, and the shared ``train.*``, ``optim.*``, ``validation.*``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rewards.training import (
    LossConfig,
    Pair,
    PairDataConfig,
    RewardModelConfig,
    TrainableReward,
    build_trainable,
    collate_pairs,
    evaluate_pairs,
    load_pairs,
    pair_loss,
    save_trained_reward,
)

from .config import LoopConfig, LoraConfig, OptimConfig, TrainingConfig, ValidationConfig
from .data import StepIndexedSampler
from .registry import Method
from .run import MicroStep, Run, StepLoss, Trainee


# ============================================================================ config
@dataclass
class PairValidationConfig(ValidationConfig):
    """Pairwise accuracy on the held-out pairs every ``every`` steps (and at step 0 and the end)."""

    every: int = 50
    batch_size: int = 32


@dataclass
class RewardModelTrainingConfig(TrainingConfig):
    method: str = "reward"
    output_dir: str = "runs/reward"
    data: PairDataConfig = field(default_factory=PairDataConfig)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False, target_modules=[]))
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(max_steps=200, batch_size=16, checkpoint_every=50,
                                                                 checkpoints_total_limit=2))  # fmt: skip
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0,
                                                                   lr_scheduler="constant_with_warmup"))  # fmt: skip
    validation: PairValidationConfig = field(default_factory=PairValidationConfig)


def check_config(cfg: RewardModelTrainingConfig) -> None:
    if not cfg.data.train:
        raise ValueError("data.train must name the training pairs (JSONL, Parquet or a datasets directory)")
    if not cfg.model.reward or "name" not in cfg.model.reward:
        raise ValueError("model.reward must be {name: ..., options: {...}} naming the reward to train")
    if cfg.lora.enabled and cfg.model.mode != "lora":
        raise ValueError(f"lora.enabled=true with model.mode={cfg.model.mode}: set model.mode=lora to train adapters")


# ============================================================================ setup
@dataclass
class RewardModelTrainee(Trainee):
    cfg: RewardModelTrainingConfig
    model: TrainableReward
    pairs: list[Pair]
    val_pairs: list[Pair]
    sampler: StepIndexedSampler
    device: torch.device
    last_validation: dict[str, float] = field(default_factory=dict)

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def validate(self, step: int) -> tuple[dict[str, float], None]:
        if not self.val_pairs:
            return {}, None
        was_training = self.model.training
        self.model.eval()
        metrics = evaluate_pairs(self.model, self.val_pairs, self.cfg.validation.batch_size, self.device)
        self.model.train(was_training)
        self.last_validation = {f"val_{k}": v for k, v in metrics.items()}
        return self.last_validation, None

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def save(self, output_dir: Path) -> Path:
        (output_dir / "final_metrics.json").write_text(json.dumps(self.last_validation, indent=2) + "\n")
        return save_trained_reward(self.model, output_dir / "reward")


def setup(run: Run) -> RewardModelTrainee:
    cfg: RewardModelTrainingConfig = run.cfg
    lora = cfg.lora
    model = build_trainable(cfg.model, lora_rank=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                            lora_targets=lora.target_modules).to(run.device)  # fmt: skip
    pairs = load_pairs(cfg.data.train, cfg.data, cfg.model.aspects)
    if cfg.data.val:
        val_pairs = load_pairs(cfg.data.val, cfg.data, cfg.model.aspects)
    else:  # a fixed held-out split of the training file
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        n_val = int(round(cfg.data.val_fraction * len(pairs)))
        val_pairs = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in order[n_val:]]
    if not pairs:
        raise ValueError("no training pairs left after the validation split")
    sampler = StepIndexedSampler(len(pairs), cfg.train.batch_size, run.num_processes, cfg.train.seed)
    return RewardModelTrainee(cfg, model, pairs, val_pairs, sampler, run.device)


# ============================================================================ the step
def reward_model_step(trainee: RewardModelTrainee, micro: MicroStep) -> StepLoss:
    cfg, model = trainee.cfg, trainee.model
    # ---------------------------------------------------------------- SAMPLE
    chosen = trainee.sampler.indices(micro.index, micro.process_index)
    batch = collate_pairs([trainee.pairs[i] for i in chosen], trainee.device)
    # ---------------------------------------------------------------- SCORE
    prompts = batch["prompts"] if model.info.needs_prompts else None
    out = model.outputs(batch["images"], prompts, **batch["cond"])
    # ---------------------------------------------------------------- LOSS
    loss = pair_loss(out.float(), batch, cfg.loss, generator=micro.generators("pair-loss", 1)[0])
    return StepLoss(loss)


REWARD_MODEL = Method("reward", RewardModelTrainingConfig, setup=setup, step=reward_model_step, check=check_config)

__all__ = ["REWARD_MODEL", "PairValidationConfig", "RewardModelTrainee", "RewardModelTrainingConfig", "reward_model_step"]
