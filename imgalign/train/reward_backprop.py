"""Reward-backpropagation fine-tuning: ReFL, DRaFT-K / DRaFT-LV / AlignProp, ImageReFL.

One recipe for the family, read top to bottom: config, setup, then a loop whose body has
three visible sections::

    SAMPLE  run the sampler without gradient up to the step(s) the method trains, then
            with gradient: decode the predicted (or final) clean latent to images in [0,1]
    SCORE   the reward of those images (differentiable), plus any regulariser terms
    UPDATE  the method's loss (imgalign.losses.reward_backprop), backward, and the
            accumulated, clipped, cross-process-averaged optimizer step

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

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import pipelines
import rewards
from pipelines import Conditioning, DiffusionAdapter, Schedule

from ..images import save_grid
from ..losses.reward_backprop import (
    alignprop_truncation_step,
    denoising_loss,
    draft_loss,
    draft_lv_loss,
    imagerefl_loss,
    refl_loss,
    refl_stop_step,
)
from .checkpoint import CheckpointManager, TrainerState, resolve_resume
from .config import (
    DataConfig,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    SamplingConfig,
    ValidationConfig,
    load_config,
    to_dict,
    to_yaml,
)
from .data import (
    Batch,
    ImageCaptionData,
    PromptData,
    StepIndexedSampler,
    load_resized,
    read_image_folder,
    read_prompts,
)
from .forward_process import noise_to_step, target_at_step
from .loop import (
    GradientStep,
    RunLogger,
    StepTimer,
    TrainingDiverged,
    broadcast_parameters,
    build_accelerator,
    build_optimizer,
    randn_like_per_image,
    setup_trainable,
    step_generators,
    step_rng,
    weight_dtype,
)

logger = logging.getLogger("imgalign.train")

Method = Literal["refl", "draft", "imagerefl"]


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
class RewardBackpropConfig:
    method: Method = "refl"
    pipeline: str = ""  # pipeline directory or hub id
    reward: str | dict[str, float] = ""  # a registered reward, "a=1,b=0.5", or {name: weight}
    reward_options: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/reward_backprop"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    refl: ReflConfig = field(default_factory=ReflConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    imagerefl: ImageReflConfig = field(default_factory=ImageReflConfig)


def load_reward_backprop_config(path: str | Path | None, overrides: list[str] = (), method: str | None = None) -> RewardBackpropConfig:
    fixed = {"method": method} if method else {}
    cfg = load_config(RewardBackpropConfig, path, overrides, **fixed)
    check_config(cfg)
    return cfg


def check_config(cfg: RewardBackpropConfig) -> None:
    """Errors that are knowable before loading any model."""
    if not cfg.pipeline:
        raise ValueError("no pipeline: set pipeline=<directory or hub id>")
    if not cfg.reward:
        raise ValueError("no reward: set reward=<name> (see `imgalign score --list`) or reward={a: 1, b: 0.5}")
    T = cfg.sampling.num_steps
    if cfg.method == "refl":
        lo, hi = cfg.refl.window
        if not 0 <= lo <= hi < T:
            raise ValueError(f"refl.window {cfg.refl.window} must lie in [0, {T - 1}] (sampling.num_steps={T})")
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
    if cfg.train.gradient_accumulation_steps < 1 or cfg.train.batch_size < 1 or cfg.train.max_steps < 1:
        raise ValueError("train.max_steps, train.batch_size and train.gradient_accumulation_steps must be >= 1")


# ============================================================================ pieces of SAMPLE
@dataclass
class StepContext:
    """Everything one micro-step's sampling needs: conditioning, schedule, seeded randomness."""

    adapter: DiffusionAdapter
    cfg: RewardBackpropConfig
    cond: Conditioning
    schedule: Schedule
    batch: Batch
    seed_step: int  # the micro-step index all seeds derive from
    process_index: int

    def generators(self, stream: str, n: int | None = None) -> list[torch.Generator]:
        n = len(self.batch.prompts) if n is None else n
        return step_generators(self.cfg.train.seed, self.seed_step, self.process_index, stream, n)

    def rng(self, stream: str):
        return step_rng(self.cfg.train.seed, self.seed_step, self.process_index, stream)


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
    stop = refl_stop_step(ctx.cfg.refl.window, ctx.rng("stop-step"))
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
        first = alignprop_truncation_step(d.truncation_mean, d.truncation_std, T, ctx.rng("truncation"))
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
    stop = refl_stop_step(c.window, ctx.rng("stop-step"))
    x = _denoise_without_grad(ctx, x_start, c.start_step, stop)
    out = _predict_with_grad(ctx, x, stop)
    images = adapter.decode(adapter.pred_x0(out, sched, stop, x))
    return Sampled(images, ctx.batch.prompts, None, extra_losses={"denoising_mse": mse},
                   metrics={"grad_step": stop, "denoising_mse": float(mse.detach())})  # fmt: skip


SAMPLERS: dict[str, Callable[[StepContext], Sampled]] = {
    "refl": sample_refl,
    "draft": sample_draft,
    "imagerefl": sample_imagerefl,
}


def pretraining_loss(adapter: DiffusionAdapter, batch: Batch, cond: Conditioning, schedule: Schedule,
                     ctx: StepContext) -> torch.Tensor:  # fmt: skip
    """Plain denoising loss on a caption/image batch at a random step of the schedule."""
    with torch.no_grad():
        x0 = adapter.encode_images(batch.images.to(adapter.device), generator=ctx.generators("pretrain-vae"))
    noise = randn_like_per_image(x0, ctx.generators("pretrain-noise")).to(x0.dtype)
    i = ctx.rng("pretrain-step").randrange(len(schedule))
    x = noise_to_step(adapter, schedule, i, x0, noise)
    out = adapter.predict(x, schedule, i, Conditioning(cond=cond.cond, uncond=None, guidance_scale=1.0, extra=cond.extra))
    return denoising_loss(out, target_at_step(adapter, schedule, i, x0, noise))


# ============================================================================ setup helpers
def encode(adapter: DiffusionAdapter, cfg: RewardBackpropConfig, prompts: list[str], source: torch.Tensor | None,
           *, guidance: bool = True) -> Conditioning:  # fmt: skip
    """Prompt (and edit source) conditioning, without gradient (the encoders are frozen)."""
    kwargs: dict[str, Any] = {}
    if cfg.sampling.guidance_scale is not None:
        kwargs["guidance_scale"] = cfg.sampling.guidance_scale
    if not guidance:
        kwargs["guidance_scale"] = 1.0
    if cfg.sampling.negative_prompt is not None:
        kwargs["negative_prompt"] = cfg.sampling.negative_prompt
    if adapter.is_edit:
        kwargs["image"] = source.to(adapter.device)
        if "image_guidance_scale" in inspect.signature(adapter.encode_prompt).parameters:  # IP2P-style models
            kwargs["image_guidance_scale"] = cfg.sampling.image_guidance_scale
    with torch.no_grad():
        return adapter.encode_prompt(prompts, **kwargs)


def score(reward: rewards.Reward, sampled: Sampled) -> torch.Tensor:
    """The reward with only the conditioning inputs it declares."""
    cond = {}
    if "source_images" in reward.info.inputs:
        if sampled.source_images is None:
            raise ValueError(f"reward {reward.name!r} needs source images: train an edit model with data.images")
        cond["source_images"] = sampled.source_images.to(sampled.images.device)
    return reward(sampled.images, sampled.prompts, **cond)


def build_data(cfg: RewardBackpropConfig, adapter: DiffusionAdapter, num_processes: int, height: int, width: int):
    B = cfg.train.batch_size
    if cfg.method == "imagerefl" or adapter.is_edit:
        if not cfg.data.images:
            what = "source images + instructions" if adapter.is_edit else "real images + captions"
            raise ValueError(f"{adapter.family} / {cfg.method} needs data.images=<folder of {what}>")
        items = read_image_folder(cfg.data.images)
        return ImageCaptionData(items, StepIndexedSampler(len(items), B, num_processes, cfg.train.seed), height, width)
    prompts = read_prompts(cfg.data.prompts)
    if not prompts:
        raise ValueError("no training prompts: set data.prompts=[...] or data.prompts=<text file>")
    return PromptData(prompts, StepIndexedSampler(len(prompts), B, num_processes, cfg.train.seed))


@contextlib.contextmanager
def ema_weights(ema: Any | None, params: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights in (validation, saving)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def validate(adapter: DiffusionAdapter, cfg: RewardBackpropConfig, reward: rewards.Reward, data, height: int,
             width: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fixed-seed images of the validation prompts (same every time) and their rewards."""
    v = cfg.validation
    if adapter.is_edit or cfg.method == "imagerefl":
        n = min(v.num_images, len(data.items))
        picked = [data.items[i] for i in range(n)]
        source = torch.stack([load_resized(item.path, height, width) for item in picked])
        prompts = v.prompts[:n] if v.prompts else [item.text for item in picked]
        batch = Batch(prompts, source)
    else:
        base = v.prompts or data.prompts
        prompts = [base[i % len(base)] for i in range(v.num_images)]
        batch = Batch(prompts, None)
    generators = [torch.Generator("cpu").manual_seed(v.seed + i) for i in range(len(batch.prompts))]
    denoiser = pipelines.unwrap_model(adapter.denoiser)
    was_training = denoiser.training
    denoiser.eval()
    with torch.no_grad():
        cond = encode(adapter, cfg, batch.prompts, batch.images)
        sched = adapter.schedule(cfg.sampling.num_steps, height=height, width=width)
        x = adapter.prepare_latents(len(batch.prompts), height, width, generator=generators)
        step_noise = [torch.Generator("cpu").manual_seed(v.seed + 10_000 + i) for i in range(len(batch.prompts))]
        for i in range(len(sched)):
            x = adapter.step(adapter.predict(x, sched, i, cond), sched, i, x, generator=step_noise)
        images = adapter.decode(x)
        was_reward_training = reward.training
        reward.eval()
        values = score(reward, Sampled(images, batch.prompts, batch.images))
        reward.train(was_reward_training)
    denoiser.train(was_training)
    return images, values


# ============================================================================ the recipe
@dataclass
class TrainResult:
    output_dir: Path
    step: int
    weights_dir: Path | None  # the LoRA (diffusers format) or full pipeline; None if stopped early
    metrics: list[dict[str, float]] = field(default_factory=list)


def train(cfg: RewardBackpropConfig, *, resume: str | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Run the recipe. ``resume``: ``"latest"`` or a checkpoint directory.

    ``stop_after_steps`` ends this invocation after that many optimizer steps in total
    (saving a checkpoint), as a preemptible job would; the schedules still target
    ``train.max_steps``, so a resumed run continues exactly where the interrupted one was.
    """
    check_config(cfg)
    out_dir = Path(cfg.output_dir)
    loop = cfg.train
    accelerator = build_accelerator(loop, out_dir)
    device, rank = accelerator.device, accelerator.process_index

    # ------------------------------------------------------------------ setup
    from accelerate.utils import set_seed

    set_seed(loop.seed)  # same on every process: identical LoRA initialisation
    adapter = pipelines.load(cfg.pipeline, dtype=weight_dtype(cfg.model.dtype, loop.mixed_precision),
                             device=device, attention=cfg.model.attention)  # fmt: skip
    if cfg.model.scheduler:
        adapter.set_scheduler(cfg.model.scheduler)
    named_params = setup_trainable(adapter, cfg.lora)
    params = list(named_params.values())
    broadcast_parameters(params, accelerator)
    if loop.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(vae=loop.vae_checkpointing)
    adapter.vae_checkpointing = loop.vae_checkpointing
    pipelines.unwrap_model(adapter.denoiser).train()

    reward = rewards.load(cfg.reward, **cfg.reward_options).to(device)
    reward.requires_grad_(False)
    reward.train()  # only updates a composite's running statistics; networks stay in eval
    regularizer = None
    if cfg.method == "imagerefl" and cfg.imagerefl.regularizer:
        regularizer = rewards.load(cfg.imagerefl.regularizer, **cfg.imagerefl.regularizer_options).to(device)
        regularizer.requires_grad_(False).eval()
        if "reference_images" not in regularizer.info.inputs:
            raise ValueError(f"imagerefl.regularizer {regularizer.name!r} must take reference_images (e.g. dino, clip-i)")

    optimizer, lr_scheduler = build_optimizer(params, cfg.optim, loop.max_steps)
    optimizer = accelerator.prepare(optimizer)  # loss scaling (fp16) and device placement
    ema = None
    if loop.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=loop.ema_decay)

    height, width = adapter.check_size(cfg.sampling.height, cfg.sampling.width)
    data = build_data(cfg, adapter, accelerator.num_processes, height, width)
    pretrain_data = None
    if cfg.method == "refl" and (cfg.refl.pretrain_weight > 0 or cfg.refl.pretrain_alternate):
        items = read_image_folder(cfg.data.pretrain_images)
        pretrain_data = ImageCaptionData(
            items, StepIndexedSampler(len(items), loop.batch_size, accelerator.num_processes, loop.seed + 1), height, width
        )

    checkpoints = CheckpointManager(out_dir / "checkpoints", total_limit=loop.checkpoints_total_limit,
                                    process_index=rank, is_main=accelerator.is_main_process,
                                    barrier=accelerator.wait_for_everyone)  # fmt: skip
    config_yaml = to_yaml(cfg)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)
    state = TrainerState()
    resume_from = resolve_resume(resume, out_dir / "checkpoints")
    if resume_from is not None:
        state = checkpoints.load(resume_from, trainable=named_params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                 ema=ema, extra_modules={"reward": reward})  # fmt: skip
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    elif resume == "latest":
        accelerator.print("no checkpoint to resume from: starting a new run")

    update = GradientStep(accelerator, params, optimizer, lr_scheduler, cfg.optim.max_grad_norm, ema)
    run_log = RunLogger(accelerator, out_dir, loop.max_steps, state.step, f"imgalign-{cfg.method}", to_dict(cfg))
    timer = StepTimer()
    accum = loop.gradient_accumulation_steps
    global_batch = loop.batch_size * accum * accelerator.num_processes
    history: list[dict[str, float]] = []
    last_checkpoint: Path | None = resume_from

    def run_validation(step: int) -> dict[str, float]:
        if not accelerator.is_main_process or cfg.validation.num_images < 1:
            return {}
        with ema_weights(ema, params):
            images, values = validate(adapter, cfg, reward, data, height, width)
        save_grid(images, out_dir / "validation" / f"step-{step:06d}.png")
        run_log.images(step, "validation", images)
        return {"val_reward_mean": float(values.mean()), "val_reward_std": float(values.std(unbiased=False))}

    def save_checkpoint() -> Path:
        extra = {f"reward.{k}": v for k, v in moving_reward_state(reward).items()}
        return checkpoints.save(state, trainable=named_params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                ema=ema, extra=extra, config_yaml=config_yaml)  # fmt: skip

    if state.step == 0 and cfg.validation.every > 0:
        metrics = run_validation(0)
        if metrics:
            run_log.log(0, metrics)
            history.append({"step": 0, **metrics})
    accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loop
    while state.step < loop.max_steps:
        step = state.step  # optimizer steps done so far; this iteration makes step + 1
        sums: dict[str, float] = {}
        rewards_seen: list[torch.Tensor] = []
        pretrain_step = cfg.method == "refl" and cfg.refl.pretrain_alternate and step % 2 == 1
        for micro in range(accum):
            micro_step = step * accum + micro
            with accelerator.accumulate():
                with accelerator.autocast():
                    # ---------------------------------------------------- SAMPLE
                    batch = (pretrain_data if pretrain_step else data).batch(micro_step, rank)
                    cond = encode(adapter, cfg, batch.prompts, batch.images, guidance=not pretrain_step)
                    schedule = adapter.schedule(cfg.sampling.num_steps, height=height, width=width)
                    ctx = StepContext(adapter, cfg, cond, schedule, batch, micro_step, rank)
                    if pretrain_step:
                        loss = cfg.refl.pretrain_weight * pretraining_loss(adapter, batch, cond, schedule, ctx)
                        parts = {"pretrain_loss": loss.detach()}
                    else:
                        sampled = SAMPLERS[cfg.method](ctx)
                        # ------------------------------------------------ SCORE
                        r = score(reward, sampled)
                        rewards_seen.append(r.detach().float())
                        similarity = None
                        if regularizer is not None:
                            reference = batch.images.to(device).repeat(len(r) // len(batch.images), 1, 1, 1)
                            similarity = regularizer(sampled.images, sampled.prompts, reference_images=reference)
                        # ------------------------------------------------ UPDATE (loss)
                        loss, parts = method_loss(cfg, r, sampled, similarity)
                        if pretrain_data is not None and not cfg.refl.pretrain_alternate:
                            p_batch = pretrain_data.batch(micro_step, rank)
                            p_cond = encode(adapter, cfg, p_batch.prompts, None, guidance=False)
                            p_loss = pretraining_loss(adapter, p_batch, p_cond, schedule, ctx)
                            loss = loss + cfg.refl.pretrain_weight * p_loss
                            parts["pretrain_loss"] = p_loss.detach()
                        for key, value in sampled.metrics.items():
                            sums[key] = sums.get(key, 0.0) + float(value) / accum
                update.note_loss(loss)
                accelerator.backward(loss)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / accum
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value) / accum
        # ---------------------------------------------------------------- UPDATE (step)
        outcome = update()
        state.step += 1
        state.samples_seen += global_batch
        if outcome.nonfinite:
            state.nonfinite_in_a_row += 1
            state.skipped_steps += 1
            accelerator.print(f"step {state.step}: non-finite loss or gradient ({sums.get('loss')}, grad norm "
                              f"{outcome.grad_norm}); step skipped ({state.nonfinite_in_a_row} in a row)")  # fmt: skip
        else:
            state.nonfinite_in_a_row = 0
        if accelerator.num_processes > 1 and sums:  # log means over processes, not the main one's
            keys = sorted(sums)
            means = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=device), reduction="mean")
            sums = dict(zip(keys, means.tolist(), strict=True))
        elapsed, throughput = timer.lap(global_batch)
        metrics = {**sums, "grad_norm": outcome.grad_norm, "lr": lr_scheduler.get_last_lr()[0],
                   "step_time_s": elapsed, "samples_per_s": throughput, "skipped": float(not outcome.applied)}  # fmt: skip
        if rewards_seen:
            all_r = accelerator.gather(torch.cat(rewards_seen).to(device))
            metrics["reward_mean"] = float(all_r.mean())
            metrics["reward_std"] = float(all_r.std(unbiased=False))
        if state.nonfinite_in_a_row >= loop.max_nonfinite_steps:
            run_log.log(state.step, metrics)
            run_log.close()
            where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise TrainingDiverged(
                f"{state.nonfinite_in_a_row} non-finite steps in a row (up to step {state.step}); stopping. {where}"
            )
        if cfg.validation.every > 0 and state.step % cfg.validation.every == 0 and state.step < loop.max_steps:
            metrics.update(run_validation(state.step))
        if state.step % loop.log_every == 0 or state.step == loop.max_steps:
            run_log.log(state.step, metrics)
        history.append({"step": state.step, **metrics})
        run_log.advance()
        stopping = stop_after_steps is not None and state.step >= stop_after_steps and state.step < loop.max_steps
        if (loop.checkpoint_every and state.step % loop.checkpoint_every == 0) or stopping:
            if state.nonfinite_in_a_row == 0:
                last_checkpoint = save_checkpoint()
        if stopping:
            run_log.close()
            accelerator.print(f"stopped after step {state.step}; resume with --resume latest")
            return TrainResult(out_dir, state.step, None, history)

    # ------------------------------------------------------------------ outputs
    final_metrics = run_validation(state.step)
    if final_metrics:
        run_log.log(state.step, final_metrics)
        history.append({"step": state.step, **final_metrics})
    if loop.checkpoint_every and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{state.step:06d}")):
        save_checkpoint()
    weights_dir = None
    if accelerator.is_main_process:
        with ema_weights(ema, params):
            weights_dir = save_weights(adapter, cfg, out_dir)
    accelerator.wait_for_everyone()
    run_log.close()
    return TrainResult(out_dir, state.step, weights_dir, history)


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


def moving_reward_state(reward: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reward state that changes while training: a composite's running statistics."""
    return {name: buf for name, buf in reward.named_buffers() if ".stats." in f".{name}"}


def save_weights(adapter: DiffusionAdapter, cfg: RewardBackpropConfig, out_dir: Path) -> Path:
    """The LoRA in the diffusers format, or the whole fine-tuned pipeline."""
    if cfg.lora.enabled:
        return pipelines.save_lora(adapter, out_dir / "lora")
    path = out_dir / "pipeline"
    adapter.denoiser = pipelines.unwrap_model(adapter.denoiser)
    adapter.pipe.save_pretrained(path, safe_serialization=True)
    return path


def run_from_config_file(method: str, config: str | None, overrides: list[str], resume: str | None = None,
                         stop_after_steps: int | None = None) -> TrainResult:  # fmt: skip
    cfg = load_reward_backprop_config(config, overrides, method)
    return train(cfg, resume=resume, stop_after_steps=stop_after_steps)


__all__ = [
    "DraftConfig",
    "ImageReflConfig",
    "ReflConfig",
    "RewardBackpropConfig",
    "TrainResult",
    "TrainingDiverged",
    "load_reward_backprop_config",
    "run_from_config_file",
    "train",
]
