"""Reward-weighted fine-tuning: offline (Lee et al. 2023) and on-policy advantage-weighted matching (AWM, 2025).

Neither follows a reward's gradient: the reward only *weights* the model's own pre-training
loss, so any judge works (the Shapes oracle, a VLM, human thumbs).

``rwr.mode=offline`` — Lee et al. 2023, "Aligning Text-to-Image Models using Human
Feedback" (arXiv:2302.12192, §3.3)::

    once    generate ``rwr.samples_per_prompt`` images per training prompt from the base
            model and label them: by the reward (``rwr.weighting=reward``: w = score;
            ``binary``: w = 1 above ``rwr.threshold``, default the median, else 0, as their
            good/bad human labels), or read a labels file (``data.source=labels``: prompt,
            image, good/bad; w = 1 for good, 0 for bad)
    step    UPDATE on ``sum(w * error) / sum(w)`` over a batch of the labelled set, plus
            ``rwr.pretrain_weight`` times the plain denoising loss on pre-training data
            (``data.pretrain_images``, real images; default: the unweighted generated set),
            their regulariser against drifting from the data distribution

``rwr.mode=awm`` — advantage-weighted matching (arXiv:2509.25050): the on-policy form for
flow (and diffusion) models. Every step samples K images per prompt from the current
model with any solver, computes group advantages ``A = (r - mean) / (std + eps)`` (clipped
to ``rwr.advantage_clip``), and minimises ``mean(A * error)`` — the pre-training loss pulled
towards above-average samples and pushed from below-average ones — plus
``rwr.kl_weight * ||v_theta - v_ref||^2`` against the reference (the LoRA-disabled network
or, under full fine-tuning, a frozen copy). The paper reports up to 24x Flow-GRPO's
efficiency; it also notes fast divergence without regularisation, hence the clip and the
KL option.

Our assumptions: one training step (noise level) per micro-batch, drawn uniformly from a
``rwr.num_timesteps`` schedule as in our DPO, each image with its own noise; the denoiser
runs without guidance on the conditional branch, as in pre-training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..losses.policy_gradient import group_advantages
from ..losses.preference import reward_weighted_loss
from .config import PipelineTrainingConfig
from .data import Batch, ImageCaptionData, StepIndexedSampler, read_image_folder
from .kto import KtoDataConfig, LabelledImage, check_labels_data, load_labelled_images
from .pipeline import check_pipeline, sample_images, score, setup_pipeline
from .preference import PreferenceTrainee, denoising_errors, on_policy_candidates, setup_preference, validation_prompts
from .registry import Method
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class RwrConfig:
    """Reward-weighted fine-tuning (offline) and advantage-weighted matching (on-policy)."""

    mode: Literal["offline", "awm"] = "offline"
    num_timesteps: int = 1000  # the schedule the training step is drawn from
    # offline
    samples_per_prompt: int = 4  # images generated per training prompt before training
    weighting: Literal["reward", "binary"] = "reward"
    threshold: float | None = None  # binary: good above this score (None: the median)
    pretrain_weight: float = 1.0  # Lee et al.'s beta: weight of the unweighted denoising loss
    # awm
    candidates: int = 4  # images sampled per prompt each step
    advantage_clip: float = 5.0
    kl_weight: float = 0.0  # weight of the output-space KL to the reference (0: none)
    reference_offload: bool = False  # full fine-tuning: keep the frozen reference copy on the CPU between forwards


@dataclass
class RwrDataConfig(KtoDataConfig):
    """Prompts to generate from (``on_policy``), or a labels file (``labels``); ``pretrain_images`` for the regulariser."""

    source: Literal["on_policy", "labels"] = "on_policy"


@dataclass
class RwrTrainingConfig(PipelineTrainingConfig):
    method: str = "rwr"
    output_dir: str = "runs/rwr"
    data: RwrDataConfig = field(default_factory=RwrDataConfig)
    rwr: RwrConfig = field(default_factory=RwrConfig)


def check_config(cfg: RwrTrainingConfig) -> None:
    check_pipeline(cfg)
    r = cfg.rwr
    if r.num_timesteps < 1:
        raise ValueError("rwr.num_timesteps must be >= 1")
    if r.pretrain_weight < 0 or r.kl_weight < 0:
        raise ValueError("rwr.pretrain_weight and rwr.kl_weight must be >= 0")
    if cfg.data.source == "labels":
        if r.mode == "awm":
            raise ValueError("rwr.mode=awm samples on-policy: use data.source=on_policy with a reward")
        check_labels_data(cfg)
        return
    if not cfg.reward:
        raise ValueError("rwr labels generated images with a reward: set reward=<name> (any reward, e.g. shapes-oracle)")
    if r.mode == "offline" and r.samples_per_prompt < 1:
        raise ValueError("rwr.samples_per_prompt must be >= 1")
    if r.mode == "awm" and r.candidates < 2:
        raise ValueError("rwr.candidates must be >= 2 (advantages compare a prompt's samples)")
    if r.advantage_clip <= 0 or not math.isfinite(r.advantage_clip):
        raise ValueError(f"rwr.advantage_clip must be a positive number, got {r.advantage_clip}")


# ============================================================================ setup
@dataclass
class WeightedSet:
    """The offline set: clean latents, their prompts and weights."""

    prompts: list[str]
    latents: torch.Tensor  # [N, C, h, w] on the CPU
    weights: torch.Tensor  # [N]
    sampler: StepIndexedSampler
    scores: torch.Tensor | None = None


@dataclass
class RwrTrainee(PreferenceTrainee):
    weighted: WeightedSet | None = None
    pretrain_data: ImageCaptionData | None = None


def setup(run: Run) -> RwrTrainee:
    cfg: RwrTrainingConfig = run.cfg
    r = cfg.rwr
    if r.mode == "awm":  # on-policy; the reference only for the KL term
        trainee = setup_preference(run, reference_offload=r.reference_offload, reference=r.kl_weight > 0,
                                   trainee_class=RwrTrainee)  # fmt: skip
    elif cfg.data.source == "labels":
        items = load_labelled_images(cfg.data.labels, cfg.sampling.height, cfg.data.skip_bad_rows)
        trainee = setup_pipeline(run, needs_reward=bool(cfg.reward), trainee_class=RwrTrainee,
                                 data=validation_prompts(cfg, [item.prompt for item in items]))  # fmt: skip
        trainee.weighted = labelled_set(trainee, items, run)
    else:
        trainee = setup_pipeline(run, needs_reward=True, trainee_class=RwrTrainee)
        if trainee.adapter.is_edit:
            raise ValueError("rwr.mode=offline generates from prompts alone: train an edit model with rwr.mode=awm")
        trainee.weighted = generated_set(trainee, run)
    if cfg.data.pretrain_images:
        items = read_image_folder(cfg.data.pretrain_images)
        sampler = StepIndexedSampler(len(items), cfg.train.batch_size, run.num_processes, cfg.train.seed + 1)
        trainee.pretrain_data = ImageCaptionData(items, sampler, trainee.height, trainee.width)
    return trainee


def generated_set(trainee: RwrTrainee, run: Run) -> WeightedSet:
    """``samples_per_prompt`` base-model images per training prompt, scored (the same set on every process)."""
    cfg, r = trainee.cfg, trainee.cfg.rwr
    prompts = [p for p in trainee.data.prompts for _ in range(r.samples_per_prompt)]
    latents, scores, batch_size = [], [], max(1, cfg.train.batch_size)
    for start in tqdm(range(0, len(prompts), batch_size), desc="rwr: generating the labelled set",
                      disable=not run.is_main):  # fmt: skip
        chunk = prompts[start : start + batch_size]
        seeds = range(cfg.train.seed * 1_000_003 + start, cfg.train.seed * 1_000_003 + start + len(chunk))
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        step_noise = [torch.Generator("cpu").manual_seed(s + 500_000) for s in seeds]
        x, images = sample_images(trainee, Batch(chunk, None), generators, step_noise)
        with torch.no_grad():
            scores.append(score(trainee.reward, images, chunk).float().cpu())
        latents.append(x.detach().cpu())
    values = torch.cat(scores)
    if r.weighting == "binary":
        threshold = values.median() if r.threshold is None else torch.tensor(r.threshold)
        weights = (values > threshold).float()
    else:
        weights = values
    sampler = StepIndexedSampler(len(prompts), cfg.train.batch_size, run.num_processes, cfg.train.seed)
    return WeightedSet(prompts, torch.cat(latents), weights, sampler, scores=values)


def labelled_set(trainee: RwrTrainee, items: list[LabelledImage], run: Run) -> WeightedSet:
    """A labels file's images as latents, weight 1 for good and 0 for bad."""
    cfg = trainee.cfg
    with torch.no_grad():
        latents = torch.cat([trainee.adapter.encode_images(item.image[None], sample=False).cpu() for item in items])
    weights = torch.tensor([float(item.desirable) for item in items])
    sampler = StepIndexedSampler(len(items), cfg.train.batch_size, run.num_processes, cfg.train.seed)
    return WeightedSet([item.prompt for item in items], latents, weights, sampler)


# ============================================================================ the steps
def pretraining_error(trainee: RwrTrainee, micro: MicroStep) -> torch.Tensor:
    """The unweighted denoising loss on pre-training data: real images if given, else the generated set."""
    cfg = trainee.cfg
    if trainee.pretrain_data is not None:
        batch = trainee.pretrain_data.batch(micro.index, micro.process_index)
        with torch.no_grad():
            x0 = trainee.adapter.encode_images(batch.images, generator=micro.generators("pretrain-vae", len(batch.prompts)))
        prompts = batch.prompts
    else:
        w = trainee.weighted
        idx = w.sampler.indices(micro.index + 7_919, micro.process_index)  # another draw than the weighted batch's
        x0, prompts = w.latents[idx], [w.prompts[i] for i in idx]
    errors = denoising_errors(trainee, micro, prompts, x0, num_timesteps=cfg.rwr.num_timesteps, reference=False,
                              stream="pretrain-")  # fmt: skip
    return errors.policy.mean()


def offline_step(trainee: RwrTrainee, micro: MicroStep) -> StepLoss:
    """Lee et al.: the reward-weighted denoising loss on the labelled set, plus the pre-training loss."""
    r, w = trainee.cfg.rwr, trainee.weighted
    # ---------------------------------------------------------------- SAMPLE (a batch of the labelled set)
    idx = w.sampler.indices(micro.index, micro.process_index)
    weights = w.weights[idx]
    # ---------------------------------------------------------------- SCORE
    errors = denoising_errors(trainee, micro, [w.prompts[i] for i in idx], w.latents[idx],
                              num_timesteps=r.num_timesteps, reference=False)  # fmt: skip
    # ---------------------------------------------------------------- LOSS
    weighted = (reward_weighted_loss(errors.policy, weights.to(errors.policy.device), normalize=True)
                if float(weights.sum()) != 0 else errors.policy.sum() * 0.0)  # fmt: skip
    loss, metrics = weighted, {"weighted_error": float(weighted.detach()), "batch_weight": float(weights.mean())}
    if r.pretrain_weight > 0:
        pretrain = pretraining_error(trainee, micro)
        loss = loss + r.pretrain_weight * pretrain
        metrics["pretrain_error"] = float(pretrain.detach())
    return StepLoss(loss, {**metrics, "timestep_index": float(errors.step)},
                    rewards=None if w.scores is None else w.scores[idx])  # fmt: skip


def awm_step(trainee: RwrTrainee, micro: MicroStep) -> StepLoss:
    """Advantage-weighted matching: on-policy samples, the denoising loss weighted by group advantages."""
    r = trainee.cfg.rwr
    # ---------------------------------------------------------------- SAMPLE
    cands = on_policy_candidates(trainee, micro, r.candidates)
    advantages = group_advantages(cands.scores, r.advantage_clip).flatten()
    prompts = [p for p in cands.prompts for _ in range(r.candidates)]
    sources = None if cands.sources is None else cands.sources.repeat_interleave(r.candidates, 0)
    # ---------------------------------------------------------------- SCORE
    with_kl = r.kl_weight > 0
    errors = denoising_errors(trainee, micro, prompts, cands.latents, num_timesteps=r.num_timesteps, sources=sources,
                              reference=with_kl, keep_outputs=with_kl)  # fmt: skip
    # ---------------------------------------------------------------- LOSS
    loss = (advantages.to(errors.policy.device) * errors.policy).mean()
    metrics = {"advantage_weighted_error": float(loss.detach()), "timestep_index": float(errors.step),
               "policy_error": float(errors.policy.mean().detach())}  # fmt: skip
    if with_kl:
        kl = (errors.policy_output.float() - errors.reference_output.float()).pow(2).mean()
        loss = loss + r.kl_weight * kl
        metrics["kl"] = float(kl.detach())
    return StepLoss(loss, metrics, rewards=cands.scores.flatten())


def rwr_step(trainee: RwrTrainee, micro: MicroStep) -> StepLoss:
    return awm_step(trainee, micro) if trainee.cfg.rwr.mode == "awm" else offline_step(trainee, micro)


RWR = Method("rwr", RwrTrainingConfig, setup=setup, step=rwr_step, check=check_config)

__all__ = ["RWR", "RwrConfig", "RwrDataConfig", "RwrTrainee", "RwrTrainingConfig", "awm_step", "offline_step", "rwr_step"]  # fmt: skip
