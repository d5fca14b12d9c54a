"""What the online-RL methods (GRPO, DiffusionNFT) share: how a rollout is laid out into updates, and its advantages.

A rollout of ``train.batch_size`` prompts x ``group_size`` images per process is trained in
chunks of ``train_batch_size`` images (the rollout is sampled in the same chunks, so the
update sees the batch layout the samples were drawn with) and split into
``updates_per_rollout`` optimizer steps. Each optimizer step's micro-steps are its chunks
times the steps (or times) trained per chunk, so the method sets
``train.gradient_accumulation_steps`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..losses.policy_gradient import group_advantages


@dataclass(frozen=True)
class RolloutLayout:
    """How one rollout of ``images`` images splits into ``updates`` optimizer steps of chunks x micro-steps."""

    images: int  # per process: train.batch_size x group_size
    chunk: int  # images per chunk (rollout and training micro-batch)
    updates: int  # optimizer steps per rollout
    per_chunk: int  # micro-steps per chunk (trained steps, or sampled times)

    @property
    def chunks(self) -> int:
        return self.images // self.chunk

    @property
    def micro_steps(self) -> int:
        """Micro-steps of one update: its chunks x ``per_chunk``."""
        return self.chunks // self.updates * self.per_chunk

    def locate(self, update: int, micro: int) -> tuple[int, int, slice]:
        """(chunk index, position among the chunk's micro-steps, the chunk's rows in the rollout) of micro-step
        ``micro`` of the rollout's update ``update``: an update's chunks are consecutive, each chunk's micro-steps too."""
        c = update * (self.chunks // self.updates) + micro // self.per_chunk
        return c, micro % self.per_chunk, slice(c * self.chunk, (c + 1) * self.chunk)


def rollout_layout(cfg: Any, section: str, *, group_size: int, train_batch_size: int | None,
                   updates_per_rollout: int, per_chunk: int) -> RolloutLayout:  # fmt: skip
    """Check the layout (one-line errors naming ``section``'s keys), set ``train.gradient_accumulation_steps``
    to one update's micro-steps, and return the layout."""
    images = cfg.train.batch_size * group_size
    chunk = train_batch_size or group_size
    if chunk < 1 or images % chunk:
        raise ValueError(f"{section}.train_batch_size={chunk} must divide the rollout's train.batch_size x "
                         f"{section}.group_size = {images} images")  # fmt: skip
    chunks = images // chunk
    if updates_per_rollout < 1 or chunks % updates_per_rollout:
        raise ValueError(f"{section}.updates_per_rollout={updates_per_rollout} must divide the rollout's {chunks} "
                         f"chunks of {section}.train_batch_size={chunk} images")  # fmt: skip
    layout = RolloutLayout(images, chunk, updates_per_rollout, per_chunk)
    accum = cfg.train.gradient_accumulation_steps
    if accum not in (1, layout.micro_steps):
        raise ValueError(f"{section} sets train.gradient_accumulation_steps to the micro-steps of one update "
                         f"({layout.micro_steps}: chunks x trained steps per chunk); remove the override (got {accum})")  # fmt: skip
    cfg.train.gradient_accumulation_steps = layout.micro_steps
    return layout


def rollout_advantages(scores: torch.Tensor, run: Any, *, clip: float | None, std: str) -> torch.Tensor:
    """Group advantages of a rollout's ``[prompts, G]`` scores; ``std="global"`` is the std of every process's scores."""
    if std == "global" and run is not None and run.num_processes > 1:
        everything = run.accelerator.gather(scores.to(run.device)).cpu()
        advantages = (scores - scores.mean(1, keepdim=True)) / (everything.std(unbiased=False) + 1e-4)
        return advantages if clip is None else advantages.clamp(-clip, clip)
    return group_advantages(scores, clip, std=std)


__all__ = ["RolloutLayout", "rollout_advantages", "rollout_layout"]
