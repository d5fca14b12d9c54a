"""Timestep-segment DPO (TPO): one LoRA expert per range of noise levels, each trained with DPO on its own pairs.

AlignHuman (arXiv:2506.11144) observed that sampling steps decide different things: the
early, high-noise steps the layout and motion, the late, low-noise steps fidelity and
detail. Its timestep-segment preference optimisation trains one LoRA expert per segment of
the timestep range, each on preference data about what its segment decides and only at
timesteps inside its segment, and at inference activates each expert in its segment
(:mod:`imgalign.sampling.segments`, ``imgalign sample --sampler segments``); a segment can
then run with fewer steps. The recipe, on top of :mod:`.preference`::

    for the segment trained at this step (``tpo.schedule``: alternate by optimizer step, or
    every segment every micro-step, ``joint``):
    SAMPLE  pairs for this segment: on-policy candidates from the current *routed* model
            labelled by the segment's own reward (``tpo.per_segment[k].reward``), best vs
            worst; or the segment's own pairs file
    SCORE   the segment's adapter alone (the others off) vs the base (all adapters off), at
            a step drawn only from the segment's steps of the ``tpo.num_timesteps`` schedule
    LOSS    Diffusion-DPO (every ``dpo`` option applies: beta, H-DPO alpha, loss type, ...)

Segments are ranges of :meth:`pipelines.DiffusionAdapter.noise_level` (0 clean, 1 noise):
``tpo.segments = [0, 0.5, 1]`` gives ``seg0`` = [0, 0.5) (late steps: detail) and ``seg1`` =
[0.5, 1] (early steps: layout). Saved as one diffusers-format LoRA per segment
(``lora/seg0``, ``lora/seg1``) plus ``lora/routing.json``.

Our assumptions, where the paper does not publish its choices: two segments split at noise
level 0.5; pairs built on-policy as best vs worst of K candidates under the segment's
reward; segments weighted equally and trained alternately by optimizer step (``joint``
sums their losses each micro-step instead); a segment's expert sees the base model, not the
other experts, as its reference; the on-policy candidates come from the full routed model.
``tpo.train_segments`` trains a subset, so segments can also come from separate runs and be
combined at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import pipelines
import rewards

from ..sampling.segments import SegmentRouting, save_routing
from .config import PipelineTrainingConfig
from .data import StepIndexedSampler
from .pipeline import score
from .preference import (
    Candidates,
    DpoConfig,
    PreferenceDataConfig,
    PreferencePairs,
    PreferenceTrainee,
    best_and_worst,
    check_preference_data,
    dataset_pairs,
    dpo_loss,
    on_policy_candidates,
    read_preference_pairs,
    setup_preference,
)
from .registry import Method
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class SegmentDataConfig:
    """What one segment's pairs are about: its labelling reward (on-policy) or its pairs file."""

    reward: str | dict[str, float] | None = None  # None: the run's reward
    reward_options: dict[str, Any] = field(default_factory=dict)
    pairs: str | None = None  # None: data.pairs


@dataclass
class TpoConfig(DpoConfig):
    """Timestep-segment DPO: the DPO options, plus the segments and their data."""

    segments: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # boundaries in noise level
    per_segment: list[SegmentDataConfig] = field(default_factory=list)  # one per segment; empty: shared data
    schedule: Literal["alternate", "joint"] = "alternate"
    train_segments: list[int] | None = None  # the segments this run trains (None: all)


@dataclass
class TpoTrainingConfig(PipelineTrainingConfig):
    method: str = "tpo"
    output_dir: str = "runs/tpo"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    tpo: TpoConfig = field(default_factory=TpoConfig)


def segment_names(cfg: TpoConfig) -> list[str]:
    return [f"seg{k}" for k in range(len(cfg.segments) - 1)]


def check_config(cfg: TpoTrainingConfig) -> None:
    t = cfg.tpo
    SegmentRouting(list(t.segments), segment_names(t))  # validates the boundaries
    n = len(t.segments) - 1
    if t.per_segment and len(t.per_segment) != n:
        raise ValueError(f"tpo.per_segment has {len(t.per_segment)} entries for {n} segments (one each, or none)")
    trained = range(n) if t.train_segments is None else t.train_segments
    if not trained or any(not 0 <= k < n for k in trained):
        raise ValueError(f"tpo.train_segments must name segments in 0..{n - 1}, got {t.train_segments}")
    if not cfg.lora.enabled:
        raise ValueError("tpo trains one LoRA per segment: set lora.enabled=true")
    if t.beta <= 0:
        raise ValueError(f"tpo.beta must be a positive number, got {t.beta}")
    check_preference_data(cfg, t.candidates, "tpo")  # the run's reward labels (or data.pairs holds) the default pairs


# ============================================================================ setup
@dataclass
class TpoTrainee(PreferenceTrainee):
    """The pipeline with one LoRA per segment, and each segment's labelling reward or pairs."""

    routing: SegmentRouting | None = None
    trained_segments: list[int] = field(default_factory=list)
    segment_rewards: list[rewards.Reward | None] = field(default_factory=list)
    segment_pairs: list[tuple[list, StepIndexedSampler] | None] = field(default_factory=list)
    segment_steps: list[list[int]] = field(default_factory=list)  # each segment's steps of the training schedule

    def prepare_step(self, schedule: pipelines.Schedule, i: int) -> None:
        """Sampling runs the routed model: the adapter of the step's segment, and only it."""
        k = self.routing.segment_of(self.adapter.noise_level(schedule, i))
        pipelines.set_active_lora(self.adapter, self.routing.adapters[k])

    def save(self, output_dir: Path) -> Path:
        """One diffusers LoRA per trained segment, and the routing file beside them."""
        directory = output_dir / "lora"
        for k in self.trained_segments:
            pipelines.save_lora(self.adapter, directory / self.routing.adapters[k], adapter_name=self.routing.adapters[k])
        trained = [name if k in self.trained_segments else None for k, name in enumerate(self.routing.adapters)]
        save_routing(SegmentRouting(list(self.routing.boundaries), trained), directory / "routing.json")
        return directory


def setup(run: Run) -> TpoTrainee:
    cfg: TpoTrainingConfig = run.cfg
    t = cfg.tpo
    names = segment_names(t)
    per_segment = t.per_segment or [SegmentDataConfig() for _ in names]
    trainee = setup_preference(run, keep_ties=t.keep_ties, trainee_class=TpoTrainee, lora_names=names)
    trainee.routing = SegmentRouting(list(t.segments), names)
    trainee.trained_segments = list(range(len(names))) if t.train_segments is None else sorted(set(t.train_segments))
    for seg in per_segment:
        reward = None
        if cfg.data.source == "on_policy" and seg.reward:
            reward = rewards.load(seg.reward, **seg.reward_options).to(cfg.reward_device or run.device)
            reward.requires_grad_(False)
        trainee.segment_rewards.append(reward)
        pairs = None
        if cfg.data.source == "pairs" and seg.pairs and seg.pairs != cfg.data.pairs:
            own = read_preference_pairs(cfg, keep_ties=t.keep_ties, path=seg.pairs)
            pairs = (own, StepIndexedSampler(len(own), cfg.train.batch_size, run.num_processes, cfg.train.seed))
        trainee.segment_pairs.append(pairs)
    trainee.segment_steps = [steps_in_segment(trainee, k) for k in range(len(names))]
    return trainee


# ============================================================================ the step
def steps_in_segment(trainee: TpoTrainee, k: int) -> list[int]:
    """The steps of the ``tpo.num_timesteps`` schedule whose noise level lies in segment ``k``."""
    adapter = trainee.adapter
    schedule = adapter.schedule(trainee.cfg.tpo.num_timesteps, height=trainee.height, width=trainee.width)
    steps = [i for i in range(len(schedule)) if trainee.routing.segment_of(adapter.noise_level(schedule, i)) == k]
    if not steps:
        raise ValueError(f"segment seg{k} {trainee.routing.boundaries[k:k + 2]} holds no step of a "
                         f"{trainee.cfg.tpo.num_timesteps}-step schedule: raise tpo.num_timesteps")  # fmt: skip
    return steps


def segment_pairs(trainee: TpoTrainee, micro: MicroStep, k: int, candidates: Candidates | None,
                  labeller: rewards.Reward | None) -> PreferencePairs:  # fmt: skip
    """Segment ``k``'s pairs: the candidates (labelled by ``labeller``) relabelled by its reward, or its pairs file."""
    t = trainee.cfg.tpo
    if candidates is None:
        own = trainee.segment_pairs[k]
        return dataset_pairs(trainee, micro, *(own or (None, None)))
    reward = trainee.segment_rewards[k] or trainee.reward
    if reward is not labeller:
        with torch.no_grad():
            scores = score(reward, candidates.images, [p for p in candidates.prompts for _ in range(t.candidates)])
        candidates = type(candidates)(candidates.prompts, candidates.sources, candidates.latents,
                                      scores.float().cpu().view(len(candidates.prompts), -1), candidates.images)  # fmt: skip
    return best_and_worst(candidates, t.margin)


def tpo_step(trainee: TpoTrainee, micro: MicroStep) -> StepLoss:
    """One micro-batch of timestep-segment DPO: the segment(s) trained now, each on its own pairs and steps."""
    cfg, t = trainee.cfg, trainee.cfg.tpo
    trained = trainee.trained_segments
    now = trained if t.schedule == "joint" else [trained[micro.step % len(trained)]]
    # ---------------------------------------------------------------- SAMPLE (once, from the routed model)
    candidates, labeller = None, None
    if cfg.data.source == "on_policy":
        labeller = trainee.segment_rewards[now[0]] or trainee.reward
        candidates = on_policy_candidates(trainee, micro, t.candidates, reward=labeller)
    losses, metrics, scores = [], {}, None
    for k in now:
        name = trainee.routing.adapters[k]
        pairs = segment_pairs(trainee, micro, k, candidates, labeller)
        # ------------------------------------------------------------ SCORE + LOSS: this segment's expert alone
        pipelines.set_active_lora(trainee.adapter, name)
        part = dpo_loss(trainee, micro, pairs, t, steps=trainee.segment_steps[k], stream=f"{name}-")
        losses.append(part.loss)
        metrics.update({f"{name}/{key}": value for key, value in part.metrics.items()})
        scores = part.rewards if scores is None else scores
    metrics["segment"] = float(now[0]) if len(now) == 1 else -1.0
    return StepLoss(torch.stack(losses).sum(), metrics, rewards=scores)


TPO = Method("tpo", TpoTrainingConfig, setup=setup, step=tpo_step, check=check_config)

__all__ = ["TPO", "SegmentDataConfig", "TpoConfig", "TpoTrainee", "TpoTrainingConfig", "steps_in_segment", "tpo_step"]
