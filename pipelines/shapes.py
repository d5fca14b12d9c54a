"""The embedded Shapes text-to-image model: a diffusers pipeline in pixel space, and its adapter.

A small rectified-flow model (``x_t = (1 - sigma) x0 + sigma noise``, velocity target
``noise - x0``) over 32x32 RGB images in [-1, 1]: a ``UNet2DConditionModel`` with two extra
input channels holding pixel coordinates (without them, words like "left"/"right" get no
spatial handle and position stays at chance), a word-level CLIP text encoder, and
``FlowMatchEulerDiscreteScheduler``. There is no VAE: the adapter's decode is the identity
map to [0, 1]. ``ShapesPipeline`` is an ordinary ``DiffusionPipeline`` (``save_pretrained``,
``from_pretrained``, ``load_lora_weights``), so everything else in the toolkit treats Shapes
exactly like a real checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .flow import FlowAdapter, _as_list


def coordinate_channels(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """[B, 2, H, W] pixel-centre coordinates in [-1, 1] (x then y)."""
    ys = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    xs = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)


class ShapesPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Pixel-space flow-matching text-to-image pipeline for the Shapes world."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder, tokenizer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.vae_scale_factor = 1
        self.default_sample_size = unet.config.sample_size if unet is not None else 32

    @property
    def vae(self) -> None:
        return None

    def encode_prompt(
        self,
        prompt: str | Sequence[str] | None,
        device: torch.device,
        do_classifier_free_guidance: bool,
        negative_prompt: str | Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden states of the text encoder; the empty prompt is the unconditional one."""
        if prompt_embeds is None:
            prompt_embeds = self._encode(_as_list(prompt), device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = [""] * prompt_embeds.shape[0] if negative_prompt is None else _as_list(negative_prompt)
            if len(negative) == 1:
                negative = negative * prompt_embeds.shape[0]
            negative_prompt_embeds = self._encode(negative, device)
        return prompt_embeds, negative_prompt_embeds if do_classifier_free_guidance else None

    def _encode(self, texts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return randn_tensor((batch_size, num_channels, height, width), generator=generator, device=device, dtype=dtype)

    def set_timesteps(self, num_steps: int, device) -> torch.Tensor:
        """``num_steps`` evenly spaced noise levels from 1 down to ``1 / num_steps`` (Euler on the flow)."""
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=device)
        return self.scheduler.timesteps

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The UNet's velocity at sigma = t / 1000, given pixel coordinates as extra channels."""
        coords = coordinate_channels(x.shape[0], x.shape[2], x.shape[3], x.device, x.dtype)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.unet(torch.cat([x, coords], dim=1), timestep, encoder_hidden_states=text, return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        height = height or self.default_sample_size
        width = width or self.default_sample_size
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        pos, neg = self.encode_prompt(prompt, device, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds)
        text = torch.cat([neg, pos]) if do_cfg else pos
        x = self.prepare_latents(pos.shape[0], self.unet.config.out_channels, height, width, pos.dtype, device, generator)
        for t in self.progress_bar(self.set_timesteps(num_inference_steps, device)):
            out = self.velocity(torch.cat([x] * 2) if do_cfg else x, t, text)
            if do_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        return self.output(x, output_type, return_dict)

    def output(self, x: torch.Tensor, output_type: str, return_dict: bool):
        """Samples in [-1, 1] -> the pipeline output: ``"pt"`` [B,3,H,W] in [0,1], ``"np"`` or ``"pil"``."""
        image = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            image = image.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            image = self.numpy_to_pil(image.permute(0, 2, 3, 1).cpu().numpy())
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class ShapesAdapter(FlowAdapter):
    """Adapter for :class:`ShapesPipeline` (pixel-space flow model, batched CFG)."""

    family = "shapes"
    pipeline_classes = ("ShapesPipeline",)
    denoiser_name = "unet"

    @classmethod
    def pipeline_type(cls) -> type[DiffusionPipeline]:
        return ShapesPipeline

    def encode_prompt(self, prompts, *, guidance_scale=3.0, negative_prompt=None, **kwargs):
        from .adapter import Conditioning

        do_cfg = guidance_scale > 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        pos, neg = self.pipe.encode_prompt(prompt, self.device, do_cfg, negative_prompt, **kwargs)
        return Conditioning(
            cond={"text": pos}, uncond={"text": neg} if do_cfg else None, guidance_scale=guidance_scale
        )

    def _set_timesteps(self, num_steps, height, width):
        return self.pipe.set_timesteps(num_steps, self.device)

    def prepare_latents(self, batch_size, height, width, generator=None, dtype=None):
        return self.pipe.prepare_latents(
            batch_size, self.denoiser.config.out_channels, height, width, dtype or self.dtype, self.device, generator
        )

    def _forward(self, latents, t, kwargs, cond):
        return self.pipe.velocity(latents, t, kwargs["text"])


__all__ = ["ShapesAdapter", "ShapesPipeline", "coordinate_channels"]
