"""The Shapes oracle as a (non-differentiable) reward, so every tool that takes a reward takes it.

It is a judge, not a training signal: nothing in the toolkit optimises it unless a method is
explicitly configured with ``--reward shapes-oracle`` (then only methods that accept
non-differentiable rewards can use it). Its :meth:`~ShapesOracleReward.details` give
evaluation reports the per-attribute breakdown through the reward contract alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rewards import Reward, RewardInfo

from .oracle import ATTRIBUTES, Judgement, judge

ASPECTS = ("overall", "exact", "quality", *ATTRIBUTES, "layout", "appearance")
# The two halves of a caption that different sampling steps decide (timestep-segment DPO labels
# its segments' pairs with them): where and how many (early, high-noise steps), and what the
# shapes look like (late, low-noise steps).
LAYOUT = ("count", "size", "position")
APPEARANCE = ("background", "colour", "shape", "quality")


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
        values = [aspect_of(j, self.aspect) for j in self.last_judgements]
        return torch.tensor(values, device=images.device)

    @torch.no_grad()
    def details(self, images, prompts=None, **cond) -> list[dict[str, float]]:
        """Every aspect of every image: ``overall``, ``exact``, ``quality`` and the six attributes."""
        images, texts, _ = self.validate(images, prompts, **cond)
        self.last_judgements = judge(images.detach().float().cpu(), texts)
        return [{aspect: aspect_of(j, aspect) for aspect in ASPECTS} for j in self.last_judgements]

    def summarize_details(self, details: Sequence[dict[str, float]]) -> dict[str, float]:
        """Named as :func:`imgalign.shapes.oracle.summarize` names them (``exact_rate``, ``acc_<attribute>``)."""
        if not details:
            return {"n": 0}
        mean = lambda key: float(np.mean([row[key] for row in details]))  # noqa: E731
        return {"n": len(details), "overall": mean("overall"), "exact_rate": mean("exact"), "quality": mean("quality"),
                **{f"acc_{a}": mean(a) for a in ATTRIBUTES}}  # fmt: skip


def aspect_of(judgement: Judgement, aspect: str) -> float:
    """One aspect of a judgement; ``layout`` and ``appearance`` are the means of their attributes."""
    if aspect in ("layout", "appearance"):
        return float(np.mean([getattr(judgement, a) for a in (LAYOUT if aspect == "layout" else APPEARANCE)]))
    return float(getattr(judgement, aspect))


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
