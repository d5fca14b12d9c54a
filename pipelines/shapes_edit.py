"""The embedded Shapes edit model: InstructPix2Pix in the Shapes world, and its adapter.

InstructPix2Pix (Brooks et al. 2023, "InstructPix2Pix: Learning to Follow Image Editing
Instructions") conditions a text-to-image denoiser on the image to edit by concatenating it
to the noisy input along the channels, and on the edit instruction through the text encoder.
Here the denoiser is the Shapes rectified-flow UNet (see :mod:`pipelines.shapes`), so its
input is ``[noisy image (3), source image in [-1, 1] (3), pixel coordinates (2)]`` = 8
channels; there is no VAE, so the "image latents" of IP2P are the source pixels themselves.

Sampling uses IP2P's two guidance scales (eq. 3 of the paper), with velocities in place of
noise predictions::

    v = v(0, 0) + s_I (v(I, 0) - v(0, 0)) + s_T (v(I, T) - v(I, 0))

three branches run as one batch ``[text + image, image only, neither]``, where "no image"
is a zero source and "no text" the empty instruction. ``ShapesEditPipeline`` is an ordinary
``DiffusionPipeline`` (``save_pretrained``, ``from_pretrained``, ``load_lora_weights``);
:class:`ShapesEditAdapter` repeats its loop body, so ``adapter.sample`` equals ``pipe(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .adapter import Conditioning
from .flow import _as_list
from .shapes import ShapesAdapter, ShapesPipeline, coordinate_channels


def ip2p_guidance(
    out_text: torch.Tensor, out_image: torch.Tensor, out_uncond: torch.Tensor, text_scale: float, image_scale: float
) -> torch.Tensor:
    """InstructPix2Pix's two-scale classifier-free guidance (Brooks et al. 2023, eq. 3).

    ``out_text``: text + image, ``out_image``: image only, ``out_uncond``: neither.
    """
    return out_uncond + text_scale * (out_text - out_image) + image_scale * (out_image - out_uncond)


class ShapesEditPipeline(ShapesPipeline):
    """Pixel-space flow-matching instruction-editing pipeline for the Shapes world.

    The components are those of :class:`~pipelines.shapes.ShapesPipeline`; the UNet takes 8
    input channels and the tokenizer knows the edit-instruction words.
    """

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet's velocity at sigma = t / 1000 for noisy ``x`` given the ``source`` in [-1, 1].

        ``source=None`` is IP2P's null image (all zeros): the unconditional image branch.
        """
        if source is None:
            source = torch.zeros_like(x)
        if source.shape != x.shape:
            raise ValueError(f"source images {tuple(source.shape)} must match the samples {tuple(x.shape)}")
        coords = coordinate_channels(x.shape[0], x.shape[2], x.shape[3], x.device, x.dtype)
        timestep = t.expand(x.shape[0]) if t.ndim == 0 else t
        model_input = torch.cat([x, source.to(x.dtype), coords], dim=1)
        return self.unet(model_input, timestep, encoder_hidden_states=text, return_dict=False)[0]

    def prepare_source(self, image, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Source image(s) -> [B, 3, H, W] in [-1, 1], one image repeated when a single one is given.

        Accepts a float tensor in [0, 1] ([B,3,H,W] or [3,H,W]), a PIL image or a list of them,
        or a uint8 numpy array [B,H,W,3] / [H,W,3].
        """
        source = _source_tensor(image)
        if source.shape[0] == 1 and batch_size > 1:
            source = source.expand(batch_size, -1, -1, -1)
        if source.shape[0] != batch_size:
            raise ValueError(f"got {source.shape[0]} source images for {batch_size} instructions")
        return (source * 2 - 1).to(device=device, dtype=dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        image=None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        image_guidance_scale: float = 1.5,
        negative_prompt: str | Sequence[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Edit ``image`` following the instruction(s) ``prompt``.

        Guidance is on when ``guidance_scale > 1`` and ``image_guidance_scale >= 1`` (as in
        diffusers' ``StableDiffusionInstructPix2PixPipeline``); then three UNet branches run
        per step. A single instruction string applies to every source image.
        """
        if image is None:
            raise ValueError("ShapesEditPipeline needs the source image: pass image=[B,3,H,W] in [0,1] (or PIL)")
        device = self._execution_device
        if isinstance(prompt, str) and prompt_embeds is None:
            prompt = [prompt] * _source_tensor(image).shape[0]
        do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
        pos, neg = self.encode_prompt(prompt, device, do_cfg, negative_prompt, prompt_embeds, negative_prompt_embeds)
        source = self.prepare_source(image, pos.shape[0], device, pos.dtype)
        height, width = source.shape[-2:]
        channels = self.unet.config.out_channels
        x = self.prepare_latents(pos.shape[0], channels, height, width, pos.dtype, device, generator)
        if do_cfg:
            text = torch.cat([pos, neg, neg])
            sources = torch.cat([source, source, torch.zeros_like(source)])
        else:
            text, sources = pos, source
        for t in self.progress_bar(self.set_timesteps(num_inference_steps, device)):
            out = self.velocity(torch.cat([x] * 3) if do_cfg else x, t, text, sources)
            if do_cfg:
                out_text, out_image, out_uncond = out.chunk(3)
                out = ip2p_guidance(out_text, out_image, out_uncond, guidance_scale, image_guidance_scale)
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        return self.output(x, output_type, return_dict)


def _source_tensor(image) -> torch.Tensor:
    """Any accepted source-image form -> float [B, 3, H, W] in [0, 1] (on its own device)."""
    if isinstance(image, torch.Tensor):
        source = image[None] if image.ndim == 3 else image
        if source.ndim != 4 or source.shape[1] != 3:
            raise ValueError(f"source image must be [B,3,H,W] or [3,H,W] in [0,1], got {tuple(image.shape)}")
        if not source.is_floating_point():
            raise ValueError(f"source image tensor must be float in [0,1], got {source.dtype}")
        return source.float()
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"source image array must be [B,H,W,3] or [H,W,3], got {image.shape}")
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / scale
    images = image if isinstance(image, (list, tuple)) else [image]
    if images and all(hasattr(im, "convert") for im in images):  # PIL images: every mode (16-bit, alpha, EXIF)
        from .images import to_rgb_array

        return torch.stack([torch.from_numpy(to_rgb_array(im, "source image")).permute(2, 0, 1) for im in images])
    raise ValueError(f"unsupported source image type {type(image).__name__}: use a tensor, numpy array or PIL image")


class ShapesEditAdapter(ShapesAdapter):
    """Adapter for :class:`ShapesEditPipeline`: IP2P's three-branch guidance, one batch."""

    family = "shapes-edit"
    pipeline_classes = ("ShapesEditPipeline",)
    is_edit = True

    @classmethod
    def pipeline_type(cls) -> type[ShapesEditPipeline]:
        return ShapesEditPipeline

    def encode_prompt(
        self,
        prompts,
        *,
        guidance_scale: float = 3.0,
        negative_prompt=None,
        image=None,
        image_guidance_scale: float = 1.5,
        **kwargs,
    ) -> Conditioning:
        """Instructions as the prompt; ``image``: source images [B,3,H,W] in [0,1] (or one for all)."""
        if image is None:
            raise ValueError("the Shapes edit model needs the source image: pass image=[B,3,H,W] in [0,1]")
        if isinstance(prompts, str) and "prompt_embeds" not in kwargs:
            prompts = [prompts] * _source_tensor(image).shape[0]
        do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        pos, neg = self.pipe.encode_prompt(prompt, self.device, do_cfg, negative_prompt, **kwargs)
        source = self.pipe.prepare_source(image, pos.shape[0], self.device, pos.dtype)
        return Conditioning(
            cond={"text": pos},
            uncond={"text": neg} if do_cfg else None,
            guidance_scale=guidance_scale,
            extra={"image_latents": source, "image_guidance_scale": image_guidance_scale},
        )

    def predict(self, latents, schedule, i, cond, *, detach_uncond=False):
        """Guided velocity at step ``i``; ``detach_uncond`` runs the two text-free branches under ``no_grad``."""
        t = schedule.timesteps[i]
        source = cond.extra["image_latents"]
        velocity = self.pipe.velocity
        with self._forward_context():
            if not cond.do_cfg:
                return velocity(latents, t, cond.cond["text"], source)
            text, null = cond.cond["text"], cond.uncond["text"]
            zeros = torch.zeros_like(source)
            if detach_uncond:
                out_text = velocity(latents, t, text, source)
                with torch.no_grad():
                    rest = velocity(torch.cat([latents] * 2), t, torch.cat([null, null]), torch.cat([source, zeros]))
                out_image, out_uncond = rest.chunk(2)
            else:
                out = velocity(
                    torch.cat([latents] * 3), t, torch.cat([text, null, null]), torch.cat([source, source, zeros])
                )
                out_text, out_image, out_uncond = out.chunk(3)
        return ip2p_guidance(out_text, out_image, out_uncond, cond.guidance_scale, cond.extra["image_guidance_scale"])

    def _forward(self, latents, t, kwargs, cond):
        return self.pipe.velocity(latents, t, kwargs["text"], cond.extra["image_latents"])


__all__ = ["ShapesEditAdapter", "ShapesEditPipeline", "ip2p_guidance"]
