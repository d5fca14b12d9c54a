"""Reward-backpropagation fine-tuning: ReFL, DRaFT-K / DRaFT-LV / AlignProp, ImageReFL.

One recipe for the family, read top to bottom: its config sections, its setup (the shared
pipeline setup plus a regulariser or pre-training data), and the step body the run skeleton
(:mod:`imgalign.train.run`) calls for every micro-batch::

    SAMPLE  run the sampler without gradient up to the step(s) the method trains, then
            with gradient: decode the predicted (or final) clean latent to images in [0,1]
    SCORE   the reward of those images (differentiable), plus any regulariser terms
    LOSS    the method's loss (imgalign.losses.reward_backprop); the skeleton does the
            backward and the accumulated, clipped, cross-process-averaged optimizer step

Methods (``method``):

* ``refl`` (Xu et al. 2023): stop at a step drawn uniformly from ``refl.window``, one
  step with gradient, x0 prediction, decode, ``ReLU(margin - r) * scale``; optionally a
  pre-training (denoising) loss on a caption/image folder, as a weighted term or on
  alternating steps.
* ``draft`` (Clark et al. 2024): gradient through the last ``draft.k`` steps to the final
  image, each denoiser call checkpointed; ``draft.lv_samples = n > 0`` is DRaFT-LV (re-noise
  the final x0 ``n`` times to the last step); ``draft.truncation_mean`` switches to
  AlignProp's randomised truncation (Prabhudesai et al. 2023).
* ``imagerefl`` (Sorokin et al. 2025): real images noised to ``imagerefl.start_step``,
  denoised without gradient to a step in ``imagerefl.window``, one gradient step; reward
  plus a denoising MSE on the real images, optionally a feature similarity to them.

Works for epsilon, v and flow models and for edit models (InstructPix2Pix, FLUX Kontext:
``data.images`` holds source images + instructions; the reward gets ``source_images``),
through the adapter's ``predict`` / ``step`` / ``pred_x0`` / ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import rewards
from pipelines import Conditioning, DiffusionAdapter, Schedule

from ..losses.reward_backprop import (
    alignprop_truncation_step,
    denoising_loss,
    draft_loss,
    draft_lv_loss,
    imagerefl_loss,
    refl_loss,
    refl_stop_step,
)
from .config import PipelineTrainingConfig
from .data import Batch, ImageCaptionData, StepIndexedSampler, read_image_folder
from .forward_process import noise_to_step, target_at_step
from .loop import randn_like_per_image
from .pipeline import PipelineTrainee, check_pipeline, score, setup_pipeline
from .registry import Method
from .run import MicroStep, Run, StepLoss

RewardBackpropMethod = Literal["refl", "draft", "imagerefl"]


# ============================================================================ config
@dataclass
class ReflConfig:
    """ReFL (ImageReward ``ReFL.py``: 40 steps, window [30, 39], margin 2, scale 1e-3)."""

    window: list[int] = field(default_factory=lambda: [30, 39])  # inclusive step indices
    margin: float | None = 2.0  # None: linear loss -r * scale
    scale: float = 1e-3
    pretrain_weight: float = 0.0  # > 0: add weight * denoising loss on data.pretrain_images
    pretrain_alternate: bool = False  # true: odd steps are pre-training steps (ImageReward SDXL script)


@dataclass
class DraftConfig:
    """DRaFT-K, DRaFT-LV and AlignProp's randomised truncation."""

    k: int = 1  # gradient through the last k steps
    lv_samples: int = 0  # n > 0: DRaFT-LV with n re-noisings (k is then 1)
    truncation_mean: float | None = None  # AlignProp: first grad step ~ N(mean, std), e.g. 42 of 50
    truncation_std: float = 5.0
    scale: float = 1.0
    checkpoint_steps: bool = True  # torch.utils.checkpoint every denoiser call with gradient


@dataclass
class ImageReflConfig:
    """ImageReFL (arXiv:2505.22569; ``ControlGenAI/ImageReFL``: start 30 of 40, window [30, 39])."""

    start_step: int = 30
    window: list[int] = field(default_factory=lambda: [30, 39])
    reward_scale: float = 1.0
    reward_offset: float = 0.0
    mse_weight: float = 0.01
    scale: float = 1e-3
    regularizer: str | dict[str, float] | None = None  # a similarity reward taking reference_images (e.g. "dino")
    regularizer_options: dict[str, Any] = field(default_factory=dict)
    regularizer_weight: float = 0.0


@dataclass
class RewardBackpropConfig(PipelineTrainingConfig):
    method: RewardBackpropMethod = "refl"
    output_dir: str = "runs/reward_backprop"
    refl: ReflConfig = field(default_factory=ReflConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    imagerefl: ImageReflConfig = field(default_factory=ImageReflConfig)


def check_config(cfg: RewardBackpropConfig) -> None:
    """Errors that are knowable before loading any model."""
    check_pipeline(cfg)
    if not cfg.reward:
        raise ValueError("no reward: set reward=<name> (see `imgalign score --list`) or reward={a: 1, b: 0.5}")
    T = cfg.sampling.num_steps
    if cfg.method == "refl":
        lo, hi = cfg.refl.window
        if not 0 <= lo <= hi < T:
            raise ValueError(f"refl.window {cfg.refl.window} must lie in [0, {T - 1}] (sampling.num_steps={T})")
        if cfg.refl.pretrain_alternate and cfg.refl.pretrain_weight <= 0:
            raise ValueError("refl.pretrain_alternate needs refl.pretrain_weight > 0 (with 0 every other step "
                             "would train nothing)")  # fmt: skip
        if (cfg.refl.pretrain_weight > 0 or cfg.refl.pretrain_alternate) and not cfg.data.pretrain_images:
            raise ValueError("the pre-training loss needs data.pretrain_images (a caption/image folder)")
    elif cfg.method == "draft":
        if not 1 <= cfg.draft.k <= T:
            raise ValueError(f"draft.k={cfg.draft.k} must be in [1, {T}]")
        if cfg.draft.lv_samples < 0:
            raise ValueError("draft.lv_samples must be >= 0")
    elif cfg.method == "imagerefl":
        lo, hi = cfg.imagerefl.window
        if not 0 <= cfg.imagerefl.start_step <= lo <= hi < T:
            raise ValueError(
                f"imagerefl needs 0 <= start_step <= window[0] <= window[1] < num_steps; got start "
                f"{cfg.imagerefl.start_step}, window {cfg.imagerefl.window}, num_steps {T}"
            )
        if not cfg.data.images:
            raise ValueError("imagerefl trains on real images: set data.images=<folder of images + captions>")


# ============================================================================ setup
@dataclass
class RewardBackpropTrainee(PipelineTrainee):
    """The shared pipeline setup, plus ImageReFL's regulariser and ReFL's pre-training data."""

    regularizer: rewards.Reward | None = None
    pretrain_data: ImageCaptionData | None = None


def setup(run: Run) -> RewardBackpropTrainee:
    cfg: RewardBackpropConfig = run.cfg
    trainee = setup_pipeline(run, needs_images=cfg.method == "imagerefl", trainee_class=RewardBackpropTrainee)
    if not trainee.reward.info.differentiable:
        raise ValueError(f"{cfg.method} backpropagates through the reward, and {trainee.reward.name!r} is not "
                         f"differentiable: use a differentiable reward, or a method that needs no reward gradient")  # fmt: skip
    if cfg.method == "imagerefl" and cfg.imagerefl.regularizer:
        regularizer = rewards.load(cfg.imagerefl.regularizer, **cfg.imagerefl.regularizer_options).to(run.device)
        regularizer.requires_grad_(False).eval()
        if "reference_images" not in regularizer.info.inputs:
            raise ValueError(f"imagerefl.regularizer {regularizer.name!r} must take reference_images (e.g. dino, clip-i)")
        trainee.regularizer = regularizer
    if cfg.method == "refl" and (cfg.refl.pretrain_weight > 0 or cfg.refl.pretrain_alternate):
        items = read_image_folder(cfg.data.pretrain_images)
        sampler = StepIndexedSampler(len(items), cfg.train.batch_size, run.num_processes, cfg.train.seed + 1)
        trainee.pretrain_data = ImageCaptionData(items, sampler, trainee.height, trainee.width)
    return trainee


# ============================================================================ pieces of SAMPLE
@dataclass
class StepContext:
    """Everything one micro-step's sampling needs: conditioning, schedule, seeded randomness."""

    adapter: DiffusionAdapter
    cfg: RewardBackpropConfig
    cond: Conditioning
    schedule: Schedule
    batch: Batch
    micro: MicroStep

    def generators(self, stream: str, n: int | None = None) -> list[torch.Generator]:
        return self.micro.generators(stream, len(self.batch.prompts) if n is None else n)

    def rng(self, stream: str):
        return self.micro.rng(stream)

    def steps_rng(self, stream: str):
        """For choices that set how many denoiser calls the step makes (the same on every process under FSDP)."""
        return self.micro.steps_rng(stream)


@dataclass
class Sampled:
    """The differentiable output of SAMPLE."""

    images: torch.Tensor  # [B', 3, H, W] in [0,1], in the graph
    prompts: list[str]  # one per image (DRaFT-LV repeats the batch)
    source_images: torch.Tensor | None = None  # edit models: the reward's source_images
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
def _denoise_without_grad(ctx: StepContext, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Steps ``[start, stop)`` of the sampler, no gradient (the pipeline's own scheduler step)."""
    step_noise = ctx.generators("scheduler")
    with torch.no_grad():
        for i in range(start, stop):
            out = ctx.adapter.predict(x, ctx.schedule, i, ctx.cond)
            x = ctx.adapter.step(out, ctx.schedule, i, x, generator=step_noise)
    return x


def _predict_with_grad(ctx: StepContext, x: torch.Tensor, i: int, *, checkpointed: bool = False) -> torch.Tensor:
    def predict(latents: torch.Tensor) -> torch.Tensor:
        return ctx.adapter.predict(latents, ctx.schedule, i, ctx.cond, detach_uncond=ctx.cfg.sampling.detach_uncond)

    # Only the denoiser call is checkpointed: scheduler steps are cheap, and stochastic ones
    # draw from explicit generators that a recomputation would advance a second time.
    return activation_checkpoint(predict, x, use_reentrant=False) if checkpointed else predict(x)


def _initial_latents(ctx: StepContext) -> torch.Tensor:
    n = len(ctx.batch.prompts)
    s = ctx.schedule
    return ctx.adapter.prepare_latents(n, s.height, s.width, generator=ctx.generators("latents"))


def sample_refl(ctx: StepContext) -> Sampled:
    """ReFL: no grad up to a random late step, then one step with grad -> x0 -> decode."""
    stop = refl_stop_step(ctx.cfg.refl.window, ctx.steps_rng("stop-step"))
    x = _denoise_without_grad(ctx, _initial_latents(ctx), 0, stop)
    out = _predict_with_grad(ctx, x, stop)
    images = ctx.adapter.decode(ctx.adapter.pred_x0(out, ctx.schedule, stop, x))
    return Sampled(images, ctx.batch.prompts, ctx.batch.images, metrics={"grad_step": stop})


def sample_draft(ctx: StepContext) -> Sampled:
    """DRaFT-K / AlignProp: gradient through the last steps to the final image; or DRaFT-LV."""
    d, T = ctx.cfg.draft, len(ctx.schedule)
    if d.lv_samples > 0:
        return _sample_draft_lv(ctx)
    if d.truncation_mean is not None:
        first = alignprop_truncation_step(d.truncation_mean, d.truncation_std, T, ctx.steps_rng("truncation"))
    else:
        first = T - d.k
    x = _denoise_without_grad(ctx, _initial_latents(ctx), 0, first)
    step_noise = ctx.generators("scheduler-grad")
    for i in range(first, T):
        out = _predict_with_grad(ctx, x, i, checkpointed=d.checkpoint_steps)
        x = ctx.adapter.step(out, ctx.schedule, i, x, generator=step_noise)
    images = ctx.adapter.decode(x)
    return Sampled(images, ctx.batch.prompts, ctx.batch.images, metrics={"grad_steps": T - first})


def _sample_draft_lv(ctx: StepContext) -> Sampled:
    """DRaFT-LV: x0 without grad, re-noised n times to the last step; one grad step each."""
    n, T = ctx.cfg.draft.lv_samples, len(ctx.schedule)
    x0 = _denoise_without_grad(ctx, _initial_latents(ctx), 0, T)
    images = []
    for j in range(n):
        noise = randn_like_per_image(x0, ctx.generators(f"lv-noise/{j}")).to(x0.dtype)
        x_last = noise_to_step(ctx.adapter, ctx.schedule, T - 1, x0, noise)
        out = _predict_with_grad(ctx, x_last, T - 1, checkpointed=ctx.cfg.draft.checkpoint_steps)
        images.append(ctx.adapter.decode(ctx.adapter.pred_x0(out, ctx.schedule, T - 1, x_last)))
    source = None if ctx.batch.images is None else ctx.batch.images.repeat(n, 1, 1, 1)
    return Sampled(torch.cat(images), ctx.batch.prompts * n, source, metrics={"lv_samples": n})


def sample_imagerefl(ctx: StepContext) -> Sampled:
    """ImageReFL: real image -> noise to start step -> no grad to a window step -> one grad step."""
    c = ctx.cfg.imagerefl
    adapter, sched = ctx.adapter, ctx.schedule
    real = ctx.batch.images.to(adapter.device)
    with torch.no_grad():
        x0_real = adapter.encode_images(real, generator=ctx.generators("vae"))
    noise = randn_like_per_image(x0_real, ctx.generators("noise")).to(x0_real.dtype)
    x_start = noise_to_step(adapter, sched, c.start_step, x0_real, noise)
    # The denoising MSE at the start step: conditional branch only, as in pre-training.
    cond_only = Conditioning(cond=ctx.cond.cond, uncond=None, guidance_scale=1.0, extra=ctx.cond.extra)
    out_start = adapter.predict(x_start, sched, c.start_step, cond_only)
    mse = denoising_loss(out_start, target_at_step(adapter, sched, c.start_step, x0_real, noise))
    stop = refl_stop_step(c.window, ctx.steps_rng("stop-step"))
    x = _denoise_without_grad(ctx, x_start, c.start_step, stop)
    out = _predict_with_grad(ctx, x, stop)
    images = adapter.decode(adapter.pred_x0(out, sched, stop, x))
    return Sampled(images, ctx.batch.prompts, None, extra_losses={"denoising_mse": mse},
                   metrics={"grad_step": stop, "denoising_mse": float(mse.detach())})  # fmt: skip


SAMPLE_FOR_METHOD: dict[str, Callable[[StepContext], Sampled]] = {
    "refl": sample_refl,
    "draft": sample_draft,
    "imagerefl": sample_imagerefl,
}


def pretraining_loss(ctx: StepContext) -> torch.Tensor:
    """Plain denoising loss on a caption/image batch at a random step of the schedule."""
    adapter, batch, cond, schedule = ctx.adapter, ctx.batch, ctx.cond, ctx.schedule
    with torch.no_grad():
        x0 = adapter.encode_images(batch.images.to(adapter.device), generator=ctx.generators("pretrain-vae"))
    noise = randn_like_per_image(x0, ctx.generators("pretrain-noise")).to(x0.dtype)
    i = ctx.rng("pretrain-step").randrange(len(schedule))
    x = noise_to_step(adapter, schedule, i, x0, noise)
    out = adapter.predict(x, schedule, i, Conditioning(cond=cond.cond, uncond=None, guidance_scale=1.0, extra=cond.extra))
    return denoising_loss(out, target_at_step(adapter, schedule, i, x0, noise))


# ============================================================================ the step
def reward_backprop_step(trainee: RewardBackpropTrainee, micro: MicroStep) -> StepLoss:
    """One micro-batch of ReFL / DRaFT / ImageReFL (or, on ReFL's alternate steps, of pre-training)."""
    cfg, adapter = trainee.cfg, trainee.adapter
    pretrain_step = cfg.method == "refl" and cfg.refl.pretrain_alternate and micro.step % 2 == 1
    # ---------------------------------------------------------------- SAMPLE
    batch = (trainee.pretrain_data if pretrain_step else trainee.data).batch(micro.index, micro.process_index)
    cond = trainee.encode(batch.prompts, batch.images, guidance=not pretrain_step)
    schedule = adapter.schedule(cfg.sampling.num_steps, height=trainee.height, width=trainee.width)
    ctx = StepContext(adapter, cfg, cond, schedule, batch, micro)
    if pretrain_step:
        loss = cfg.refl.pretrain_weight * pretraining_loss(ctx)
        return StepLoss(loss, {"pretrain_loss": loss.detach()})
    sampled = SAMPLE_FOR_METHOD[cfg.method](ctx)
    # ---------------------------------------------------------------- SCORE
    r = score(trainee.reward, sampled.images, sampled.prompts, sampled.source_images)
    similarity = None
    if trainee.regularizer is not None:
        reference = batch.images.to(r.device).repeat(len(r) // len(batch.images), 1, 1, 1)
        similarity = trainee.regularizer(sampled.images, sampled.prompts, reference_images=reference)
    # ---------------------------------------------------------------- LOSS
    loss, parts = method_loss(cfg, r, sampled, similarity)
    if trainee.pretrain_data is not None and not cfg.refl.pretrain_alternate:
        p_batch = trainee.pretrain_data.batch(micro.index, micro.process_index)
        p_cond = trainee.encode(p_batch.prompts, None, guidance=False)
        p_loss = pretraining_loss(StepContext(adapter, cfg, p_cond, schedule, p_batch, micro))
        loss = loss + cfg.refl.pretrain_weight * p_loss
        parts["pretrain_loss"] = p_loss.detach()
    return StepLoss(loss, {**sampled.metrics, **parts}, rewards=r)


def method_loss(cfg: RewardBackpropConfig, r: torch.Tensor, sampled: Sampled,
                similarity: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The method's objective from the rewards (and regulariser terms) of this micro-batch."""
    if cfg.method == "refl":
        return refl_loss(r, margin=cfg.refl.margin, scale=cfg.refl.scale), {}
    if cfg.method == "draft":
        if cfg.draft.lv_samples > 0:
            return draft_lv_loss(r, scale=cfg.draft.scale), {}
        return draft_loss(r, scale=cfg.draft.scale), {}
    c = cfg.imagerefl
    loss = imagerefl_loss(
        r, sampled.extra_losses["denoising_mse"], reward_scale=c.reward_scale, reward_offset=c.reward_offset,
        mse_weight=c.mse_weight, scale=c.scale, feature_similarity=similarity, feature_weight=c.regularizer_weight,
    )  # fmt: skip
    parts = {"denoising_mse": sampled.extra_losses["denoising_mse"].detach()}
    if similarity is not None:
        parts["feature_similarity"] = similarity.detach().float().mean()
    return loss, parts


# ============================================================================ registration
# One setup and one step for the family; the method name picks the SAMPLE and the loss. The
# one-line help of each is in the registry's table (so `imgalign train --help` needs no torch).
REFL = Method("refl", RewardBackpropConfig, setup=setup, step=reward_backprop_step, check=check_config)
DRAFT = Method("draft", RewardBackpropConfig, setup=setup, step=reward_backprop_step, check=check_config)
IMAGEREFL = Method("imagerefl", RewardBackpropConfig, setup=setup, step=reward_backprop_step, check=check_config)

__all__ = [
    "DRAFT",
    "IMAGEREFL",
    "REFL",
    "DraftConfig",
    "ImageReflConfig",
    "ReflConfig",
    "RewardBackpropConfig",
    "RewardBackpropTrainee",
    "Sampled",
    "StepContext",
    "check_config",
    "method_loss",
    "reward_backprop_step",
    "setup",
]
