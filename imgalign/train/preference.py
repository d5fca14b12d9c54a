"""Preference optimisation of a pipeline: Diffusion-DPO and H-DPO, on a pairs dataset or on on-policy pairs.

One recipe, read top to bottom: its config sections, its setup (the shared pipeline setup,
plus the pairs when they come from a file), and the step the run skeleton calls::

    SAMPLE  a preference pair per prompt: from the dataset (Pick-a-Pic style: prompt,
            image_0/image_1, label), or on-policy: K candidates per prompt from the current
            model, scored by any reward (differentiable or not, e.g. the Shapes oracle or a
            VLM judge), best vs worst, pairs whose score gap is at most ``dpo.margin``
            dropped; then winner and loser noised to the same step with the same noise
    SCORE   per-sample denoising errors of the policy (LoRA on) and of the reference (the
            same network with the LoRA disabled: no second copy in memory)
    LOSS    :func:`imgalign.losses.preference.diffusion_dpo_loss` (``sigmoid``, ``ipo``,
            ``hinge``; ``dpo.alpha`` != 1 is H-DPO)

Works for epsilon, v and flow models through the adapter's ``predict`` and the forward
process of :mod:`imgalign.train.forward_process` (the target is the model's own
parameterisation). Assumptions of ours, stated because the papers do not fix them for every
family: the training step is drawn uniformly from a ``dpo.num_timesteps``-step schedule of
the model's scheduler (uniform over the training timesteps for epsilon/v models; the
scheduler's shifted sigmas for flow models), and the denoiser runs without classifier-free
guidance on the conditional branch, as in pre-training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

import pipelines
from pipelines import Conditioning

from ..losses.preference import diffusion_dpo_loss, per_sample_error
from .config import DataConfig, PipelineTrainingConfig
from .data import Batch, PromptData, StepIndexedSampler, read_prompts
from .forward_process import noise_to_step, target_at_step
from .loop import randn_like_per_image
from .pipeline import PipelineTrainee, check_pipeline, sample_images, score, setup_pipeline
from .registry import Method
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class DpoConfig:
    """Diffusion-DPO (Wallace et al. 2024) and H-DPO (Omura et al. 2024)."""

    beta: float = 5000.0  # Wallace et al.: 5000 for SD1.5 / SDXL on Pick-a-Pic v2
    alpha: float = 1.0  # H-DPO: weight of the policy term; 1 is DPO
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    num_timesteps: int = 1000  # the schedule the training step is drawn from
    candidates: int = 2  # on-policy: images sampled per prompt; the pair is the best and the worst
    margin: float = 0.0  # on-policy: drop pairs whose reward gap is at most this
    keep_ties: bool = False  # dataset: train on tied pairs (label 0.5) as well (random order) instead of dropping them


@dataclass
class PreferenceDataConfig(DataConfig):
    """Prompts (on-policy pairs) or a pairs file (JSONL, Parquet or a ``datasets`` directory)."""

    source: Literal["on_policy", "pairs"] = "on_policy"
    pairs: str | None = None  # prompt, image_0/image_1 (paths or bytes), label (A/B/tie, 0/1/0.5)


@dataclass
class DpoTrainingConfig(PipelineTrainingConfig):
    method: str = "dpo"
    output_dir: str = "runs/dpo"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)


def check_config(cfg: DpoTrainingConfig) -> None:
    check_pipeline(cfg)
    if not cfg.lora.enabled:
        raise ValueError("dpo uses the LoRA-disabled network as its reference: set lora.enabled=true "
                         "(full fine-tuning with a frozen copy is not supported yet)")  # fmt: skip
    d = cfg.dpo
    if d.beta <= 0 or not math.isfinite(d.beta):
        raise ValueError(f"dpo.beta must be a positive number, got {d.beta}")
    if d.num_timesteps < 1:
        raise ValueError("dpo.num_timesteps must be >= 1")
    if cfg.data.source == "on_policy":
        if not cfg.reward:
            raise ValueError("on-policy pairs are labelled by a reward: set reward=<name> (any reward, e.g. shapes-oracle)")
        if d.candidates < 2:
            raise ValueError("dpo.candidates must be >= 2 (the pair is the best and the worst candidate)")
    elif not cfg.data.pairs:
        raise ValueError("data.source=pairs needs data.pairs=<JSONL, Parquet or datasets directory of pairs>")
    elif cfg.sampling.height is None or cfg.sampling.height != cfg.sampling.width:
        raise ValueError("a pairs dataset is resized to a square: set sampling.height and sampling.width (equal)")


# ============================================================================ setup
@dataclass
class DpoTrainee(PipelineTrainee):
    """The shared pipeline setup, plus the dataset's pairs (``data.source=pairs``)."""

    pairs: list | None = None
    pair_sampler: StepIndexedSampler | None = None


def setup(run: Run) -> DpoTrainee:
    cfg: DpoTrainingConfig = run.cfg
    if cfg.data.source == "on_policy":
        trainee = setup_pipeline(run, needs_reward=True, trainee_class=DpoTrainee)
        if trainee.adapter.is_edit:
            raise ValueError(f"dpo does not train edit models ({trainee.adapter.family}) yet")
        return trainee
    from rewards.training import PairDataConfig, load_pairs

    pairs = load_pairs(cfg.data.pairs, PairDataConfig(image_size=cfg.sampling.height))
    bad = [n for n, p in enumerate(pairs, 1) if math.isnan(p.target)]
    if bad:
        raise ValueError(f"{cfg.data.pairs}: pairs without a label (rows {bad[:10]}); label them A, B or tie")
    if not cfg.dpo.keep_ties:
        pairs = [p for p in pairs if p.target != 0.5]
    if not pairs:
        raise ValueError(f"{cfg.data.pairs}: no pairs left to train on (all ties? set dpo.keep_ties=true)")
    prompts = cfg.validation.prompts or read_prompts(cfg.data.prompts) or [p.prompt or "" for p in pairs]
    validation_prompts = PromptData(prompts, StepIndexedSampler(len(prompts), 1))
    sampler = StepIndexedSampler(len(pairs), cfg.train.batch_size, run.num_processes, cfg.train.seed)
    return setup_pipeline(run, needs_reward=bool(cfg.reward), data=validation_prompts, trainee_class=DpoTrainee,
                          pairs=pairs, pair_sampler=sampler)  # fmt: skip


# ============================================================================ pieces of SAMPLE
@dataclass
class PreferencePairs:
    """Clean latents of winners and losers for one micro-batch, and which pairs to train on."""

    prompts: list[str]
    winners: torch.Tensor  # [B, C, h, w]
    losers: torch.Tensor
    keep: torch.Tensor  # [B] bool
    metrics: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # the labelling reward of every candidate (on-policy)


def on_policy_pairs(trainee: DpoTrainee, micro: MicroStep) -> PreferencePairs:
    """K samples per prompt from the current model, labelled by the reward: best vs worst."""
    cfg, k = trainee.cfg, trainee.cfg.dpo.candidates
    batch = trainee.data.batch(micro.index, micro.process_index)
    n = len(batch.prompts)
    repeated = Batch([p for p in batch.prompts for _ in range(k)],
                     None if batch.images is None else batch.images.repeat_interleave(k, 0))  # fmt: skip
    latents, images = sample_images(trainee, repeated, micro.generators("candidates", n * k),
                                    micro.generators("candidate-steps", n * k))  # fmt: skip
    with torch.no_grad():
        scores = score(trainee.reward, images, repeated.prompts, repeated.images).float().view(n, k)
    best, worst = scores.argmax(1), scores.argmin(1)
    gap = scores.max(1).values - scores.min(1).values
    keep = gap > cfg.dpo.margin
    rows = torch.arange(n) * k
    latents = latents.detach()
    return PreferencePairs(batch.prompts, latents[rows + best.cpu()], latents[rows + worst.cpu()],
                           keep=keep.cpu(), scores=scores.flatten(),
                           metrics={"pair_gap": float(gap.mean()), "pairs_kept": float(keep.float().mean())})  # fmt: skip


def dataset_pairs(trainee: DpoTrainee, micro: MicroStep) -> PreferencePairs:
    """Pairs from the dataset, encoded to latents; a tie (kept by ``dpo.keep_ties``) in random order."""
    adapter = trainee.adapter
    chosen = [trainee.pairs[i] for i in trainee.pair_sampler.indices(micro.index, micro.process_index)]
    a = torch.stack([p.image_a for p in chosen])
    b = torch.stack([p.image_b for p in chosen])
    a_wins = torch.tensor([p.target > 0.5 for p in chosen])
    ties = torch.tensor([p.target == 0.5 for p in chosen])
    if ties.any():  # a tie has no winner: a random order each time it is drawn
        a_wins = torch.where(ties, torch.rand(len(chosen), generator=micro.generators("tie-order", 1)[0]) < 0.5, a_wins)
    winners = torch.where(a_wins.view(-1, 1, 1, 1), a, b)
    losers = torch.where(a_wins.view(-1, 1, 1, 1), b, a)
    if winners.shape[-2:] != (trainee.height, trainee.width):
        winners, losers = (F.interpolate(x, size=(trainee.height, trainee.width), mode="bilinear", antialias=True)
                           for x in (winners, losers))  # fmt: skip
    with torch.no_grad():
        both = adapter.encode_images(torch.cat([winners, losers]), generator=micro.generators("vae", 2 * len(chosen)))
    w, l = both.chunk(2)
    return PreferencePairs([p.prompt or "" for p in chosen], w, l, keep=torch.ones(len(chosen), dtype=torch.bool))


# ============================================================================ the step
def dpo_step(trainee: DpoTrainee, micro: MicroStep) -> StepLoss:
    """One micro-batch of Diffusion-DPO / H-DPO."""
    cfg, adapter = trainee.cfg, trainee.adapter
    # ---------------------------------------------------------------- SAMPLE
    pairs = on_policy_pairs(trainee, micro) if cfg.data.source == "on_policy" else dataset_pairs(trainee, micro)
    n = len(pairs.prompts)
    cond = trainee.encode(pairs.prompts + pairs.prompts, None, guidance=False)
    cond = Conditioning(cond=cond.cond, uncond=None, guidance_scale=1.0, extra=cond.extra)
    schedule = adapter.schedule(cfg.dpo.num_timesteps, height=trainee.height, width=trainee.width)
    i = micro.rng("timestep").randrange(len(schedule))  # one step per micro-batch: winner and loser share it
    x0 = torch.cat([pairs.winners, pairs.losers]).to(adapter.device)
    noise = randn_like_per_image(x0[:n], micro.generators("noise", n)).repeat(2, 1, 1, 1).to(x0.dtype)
    x = noise_to_step(adapter, schedule, i, x0, noise)
    target = target_at_step(adapter, schedule, i, x0, noise)
    # ---------------------------------------------------------------- SCORE
    policy = per_sample_error(adapter.predict(x, schedule, i, cond), target)
    with torch.no_grad(), pipelines.lora_disabled(adapter):
        reference = per_sample_error(adapter.predict(x, schedule, i, cond), target)
    # ---------------------------------------------------------------- LOSS
    out = diffusion_dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=cfg.dpo.beta,
                             alpha=cfg.dpo.alpha, loss_type=cfg.dpo.loss_type, mask=pairs.keep.to(policy.device))  # fmt: skip
    metrics = {"implicit_accuracy": out.implicit_accuracy.detach(), "reward_margin": out.reward_margin.detach(),
               "policy_error_w": policy[:n].mean().detach(), "policy_error_l": policy[n:].mean().detach(),
               "timestep_index": float(i), **pairs.metrics}  # fmt: skip
    return StepLoss(out.loss, metrics, rewards=pairs.scores)


DPO = Method("dpo", DpoTrainingConfig, setup=setup, step=dpo_step, check=check_config)

__all__ = ["DPO", "DpoConfig", "DpoTrainee", "DpoTrainingConfig", "PreferenceDataConfig", "PreferencePairs",
           "dataset_pairs", "dpo_step", "on_policy_pairs"]  # fmt: skip
