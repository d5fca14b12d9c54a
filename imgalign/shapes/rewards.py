"""The Shapes oracle as a (non-differentiable) reward, so every tool that takes a reward takes it.

It is a judge, not a training signal: nothing in the toolkit optimises it unless a method is
explicitly configured with ``--reward shapes-oracle`` (then only methods that accept
non-differentiable rewards can use it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rewards import Reward, RewardInfo

from .oracle import ATTRIBUTES, Judgement, judge

ASPECTS = ("overall", "exact", "quality", *ATTRIBUTES)


class ShapesOracleReward(Reward):
    """``score`` = one aspect of :func:`imgalign.shapes.oracle.judge` (default: overall in [0,1])."""

    def __init__(self, aspect: str = "overall") -> None:
        super().__init__()
        if aspect not in ASPECTS:
            raise ValueError(f"unknown oracle aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
        self.aspect = aspect
        self.last_judgements: list[Judgement] = []
        self.info = RewardInfo(
            name="shapes-oracle" if aspect == "overall" else f"shapes-oracle-{aspect}",
            inputs=("images", "prompts"),
            differentiable=False,
            source="imgalign.shapes.oracle: exact programmatic judge of the Shapes world",
            score_range=(0.0, 1.0),
        )

    def _score(self, images: torch.Tensor, prompts: list[str], **cond) -> torch.Tensor:
        self.last_judgements = judge(images.detach().float().cpu(), prompts)
        values = [float(getattr(j, self.aspect)) for j in self.last_judgements]
        return torch.tensor(values, device=images.device)


def shapes_oracle(aspect: str = "overall") -> ShapesOracleReward:
    return ShapesOracleReward(aspect)


def load_shipped_reward(model: str, name: str, checkpoint: str | None = None) -> Reward:
    """A reward trained with ``train-reward`` and shipped in ``weights/<model>`` (or ``checkpoint``),
    under its registered ``name``."""
    import dataclasses

    import rewards

    from .manifest import WEIGHTS_DIR

    reward = rewards.load(str(Path(checkpoint) if checkpoint else WEIGHTS_DIR / model))
    reward.info = dataclasses.replace(reward.info, name=name)
    return reward
