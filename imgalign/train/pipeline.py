"""What every trainer of a diffusion pipeline sets up: the adapter, its trainable weights, the reward, the data.

:func:`setup_pipeline` is the ``setup`` half of a pipeline method (reward backprop, and the
preference and RL methods): it loads the pipeline through :func:`pipelines.load`, adds LoRA
(or unfreezes the denoiser), loads the reward and builds step-addressed data, and returns a
:class:`PipelineTrainee` whose validation (a fixed-seed image grid and its reward) and
outputs (a diffusers LoRA, or the whole pipeline) the run skeleton calls. Methods that need
more keep a subclass of it in their own recipe file.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import pipelines
import rewards
from pipelines import Conditioning, DiffusionAdapter

from .config import PipelineTrainingConfig
from .data import Batch, ImageCaptionData, PromptData, StepIndexedSampler, load_resized, read_image_folder, read_prompts
from .loop import setup_trainable, weight_dtype
from .run import Run, Trainee


@dataclass
class PipelineTrainee(Trainee):
    """A pipeline being trained: the adapter, its trainable weights, the reward and the data."""

    cfg: PipelineTrainingConfig
    adapter: DiffusionAdapter
    trainable: dict[str, torch.nn.Parameter]
    reward: rewards.Reward | None
    data: PromptData | ImageCaptionData
    height: int
    width: int

    def encode(self, prompts: list[str], source: torch.Tensor | None, *, guidance: bool = True) -> Conditioning:
        return encode(self.adapter, self.cfg, prompts, source, guidance=guidance)

    def validate(self, step: int) -> tuple[dict[str, float], torch.Tensor | None]:
        if self.cfg.validation.num_images < 1:
            return {}, None
        images, batch = validation_images(self)
        if self.reward is None:
            return {}, images
        was_training = self.reward.training
        self.reward.eval()
        with torch.no_grad():
            values = score(self.reward, images, batch.prompts, batch.images)
        self.reward.train(was_training)
        return {"val_reward_mean": float(values.mean()), "val_reward_std": float(values.std(unbiased=False))}, images

    def save(self, output_dir: Path) -> Path:
        """The LoRA in the diffusers format, or the whole fine-tuned pipeline."""
        if self.cfg.lora.enabled:
            return pipelines.save_lora(self.adapter, output_dir / "lora")
        path = output_dir / "pipeline"
        self.adapter.denoiser = pipelines.unwrap_model(self.adapter.denoiser)
        self.adapter.pipe.save_pretrained(path, safe_serialization=True)
        return path

    def moving_state(self) -> dict[str, torch.nn.Module]:
        return {} if self.reward is None else {"reward": self.reward}

    def trainable_module(self) -> torch.nn.Module:
        return pipelines.unwrap_model(self.adapter.denoiser)

    def prepare_step(self, schedule: pipelines.Schedule, i: int) -> None:
        """Called before every sampling step: a trainee whose weights depend on the step (one LoRA per
        timestep segment) switches them here."""


def setup_pipeline(run: Run, *, needs_reward: bool = True, needs_images: bool = False,
                   data: PromptData | ImageCaptionData | None = None, trainee_class: type[PipelineTrainee] = PipelineTrainee,
                   lora_names: Sequence[str] = ("default",), **extra: Any) -> PipelineTrainee:  # fmt: skip
    """Load the pipeline, add LoRA, load the reward, build the data (``needs_images``: image/caption folder).

    ``data`` replaces the prompts/images the config names (a method with its own data);
    ``lora_names`` adds one LoRA per name (one per timestep segment);
    ``trainee_class`` and ``extra`` let a method keep its own fields on a subclass.
    """
    cfg: PipelineTrainingConfig = run.cfg
    loop = cfg.train
    adapter = pipelines.load(cfg.pipeline, dtype=weight_dtype(cfg.model.dtype, loop.mixed_precision),
                             device=run.device, attention=cfg.model.attention)  # fmt: skip
    if cfg.model.scheduler:
        adapter.set_scheduler(cfg.model.scheduler)
    trainable = setup_trainable(adapter, cfg.lora, lora_names)
    if loop.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(vae=loop.vae_checkpointing)
    adapter.vae_checkpointing = loop.vae_checkpointing
    pipelines.unwrap_model(adapter.denoiser).train()

    reward = None
    if needs_reward:
        reward = rewards.load(cfg.reward, **cfg.reward_options).to(cfg.reward_device or run.device)
        reward.requires_grad_(False)
        reward.train()  # only updates a composite's running statistics; networks stay in eval
    height, width = adapter.check_size(cfg.sampling.height, cfg.sampling.width)
    if data is None:
        data = build_data(cfg, adapter, run.num_processes, height, width, images=needs_images)
    return trainee_class(cfg=cfg, adapter=adapter, trainable=trainable, reward=reward, data=data, height=height,
                         width=width, **extra)  # fmt: skip


def check_pipeline(cfg: PipelineTrainingConfig) -> None:
    """The check every pipeline method's config starts with: there is a pipeline to train."""
    if not cfg.pipeline:
        raise ValueError("no pipeline: set pipeline=<directory, hub id or a named pipeline such as shapes>")
    if cfg.reward_device is not None:
        try:
            torch.device(cfg.reward_device)
        except (RuntimeError, ValueError):
            raise ValueError(f"reward_device={cfg.reward_device!r} is not a device: use cpu, cuda or cuda:N, or leave "
                             "it unset for the run's device") from None  # fmt: skip


def build_data(cfg: PipelineTrainingConfig, adapter: DiffusionAdapter, num_processes: int, height: int, width: int,
               *, images: bool = False) -> PromptData | ImageCaptionData:  # fmt: skip
    """Prompts, or an image/caption folder for edit models and for methods that train on real images."""
    B = cfg.train.batch_size
    if images or adapter.is_edit:
        if not cfg.data.images:
            what = "source images + instructions" if adapter.is_edit else "real images + captions"
            raise ValueError(f"{adapter.family} / {cfg.method} needs data.images=<folder of {what}>")
        items = read_image_folder(cfg.data.images)
        return ImageCaptionData(items, StepIndexedSampler(len(items), B, num_processes, cfg.train.seed), height, width)
    prompts = read_prompts(cfg.data.prompts)
    if not prompts:
        raise ValueError("no training prompts: set data.prompts=[...] or data.prompts=<text file>")
    return PromptData(prompts, StepIndexedSampler(len(prompts), B, num_processes, cfg.train.seed))


def encode(adapter: DiffusionAdapter, cfg: PipelineTrainingConfig, prompts: list[str], source: torch.Tensor | None,
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


def score(reward: rewards.Reward, images: torch.Tensor, prompts: list[str],
          source_images: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The reward with only the conditioning inputs it declares, on the reward's device (``reward_device``):
    images go there and the scores come back to the images' device (gradients flow through both moves)."""
    where = reward_device(reward) or images.device
    cond = {}
    if "source_images" in reward.info.inputs:
        if source_images is None:
            raise ValueError(f"reward {reward.name!r} needs source images: train an edit model with data.images")
        cond["source_images"] = source_images.to(where)
    return reward(images.to(where), prompts, **cond).to(images.device)


def reward_device(reward: torch.nn.Module) -> torch.device | None:
    """Where the reward's weights are; ``None`` for a reward without any (an oracle, a remote reward), which
    scores wherever its inputs are."""
    for tensor in itertools.chain(reward.parameters(), reward.buffers()):
        return tensor.device
    return None


def validation_images(trainee: PipelineTrainee) -> tuple[torch.Tensor, Batch]:
    """Fixed-seed images of the validation prompts (the same every time), and the batch they came from."""
    cfg, data = trainee.cfg, trainee.data
    v, height, width = cfg.validation, trainee.height, trainee.width
    if isinstance(data, ImageCaptionData):
        n = min(v.num_images, len(data.items))
        picked = [data.items[i] for i in range(n)]
        source = torch.stack([load_resized(item.path, height, width) for item in picked])
        prompts = v.prompts[:n] if v.prompts else [item.text for item in picked]
        batch = Batch(prompts, source)
    else:
        base = v.prompts or data.prompts
        batch = Batch([base[i % len(base)] for i in range(v.num_images)], None)
    generators = [torch.Generator("cpu").manual_seed(v.seed + i) for i in range(len(batch.prompts))]
    step_noise = [torch.Generator("cpu").manual_seed(v.seed + 10_000 + i) for i in range(len(batch.prompts))]
    _, images = sample_images(trainee, batch, generators, step_noise)
    return images, batch


def sample_images(trainee: PipelineTrainee, batch: Batch, generators: list[torch.Generator],
                  step_noise: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The pipeline's own sampling loop, without gradient and in eval mode: (final latents, images).

    Image ``b`` starts from ``generators[b]``'s noise; stochastic scheduler steps draw from
    ``step_noise[b]``. The current weights sample (LoRA enabled), as in validation and on-policy data.
    """
    cfg, adapter = trainee.cfg, trainee.adapter
    denoiser = pipelines.unwrap_model(adapter.denoiser)
    was_training = denoiser.training
    denoiser.eval()
    with torch.no_grad():
        cond = trainee.encode(batch.prompts, batch.images)  # through the trainee: a method may change guidance
        sched = adapter.schedule(cfg.sampling.num_steps, height=trainee.height, width=trainee.width)
        x = adapter.prepare_latents(len(batch.prompts), trainee.height, trainee.width, generator=generators)
        for i in range(len(sched)):
            trainee.prepare_step(sched, i)
            x = adapter.step(adapter.predict(x, sched, i, cond), sched, i, x, generator=step_noise)
        images = adapter.decode(x)
    denoiser.train(was_training)
    return x, images


__all__ = ["PipelineTrainee", "build_data", "check_pipeline", "encode", "reward_device", "sample_images", "score",
           "setup_pipeline", "validation_images"]
