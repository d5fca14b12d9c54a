"""UNet families: Stable Diffusion 1.x/2.x (epsilon or v), SDXL, and InstructPix2Pix (editing).

Each adapter calls the pipeline's own helpers (``encode_prompt``, ``prepare_latents``,
``prepare_image_latents``, ``_get_add_time_ids``) and repeats the body of its ``__call__``
loop, so the deterministic loop reproduces ``pipe(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapter import Conditioning, DiffusionAdapter, Generator


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


class UNetAdapter(DiffusionAdapter):
    """Shared UNet pieces: latent preparation, scaled model input, and the UNet call."""

    denoiser_name = "unet"

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: Generator = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        channels = self.pipe.vae.config.latent_channels if self.is_edit else self.denoiser.config.in_channels
        return self.pipe.prepare_latents(
            batch_size, channels, height, width, dtype or self.dtype, self.device, generator
        )

    def predict(self, latents, schedule, i, cond, *, detach_uncond=False):
        with self._scheduler_at(i):
            return super().predict(latents, schedule, i, cond, detach_uncond=detach_uncond)

    def _scaled(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.scale_model_input(latents, t)

    def _forward(self, latents, t, kwargs, cond):
        return self.denoiser(self._scaled(latents, t), t, return_dict=False, **kwargs)[0]


class StableDiffusionAdapter(UNetAdapter):
    """SD 1.x / 2.x: epsilon or v-prediction, read from the scheduler config."""

    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    def encode_prompt(self, prompts, *, guidance_scale=7.5, negative_prompt=None, **kwargs) -> Conditioning:
        do_cfg = guidance_scale > 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        pos, neg = self.pipe.encode_prompt(
            prompt, self.device, 1, do_cfg, negative_prompt, **kwargs
        )
        return Conditioning(
            cond={"encoder_hidden_states": pos},
            uncond={"encoder_hidden_states": neg} if do_cfg else None,
            guidance_scale=guidance_scale,
        )


class StableDiffusionXLAdapter(UNetAdapter):
    """SDXL: two text encoders, pooled text embeddings and size/crop micro-conditioning."""

    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def encode_prompt(self, prompts, *, guidance_scale=5.0, negative_prompt=None, **kwargs) -> Conditioning:
        do_cfg = guidance_scale > 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt, **kwargs,
        )  # fmt: skip
        te2 = self.pipe.text_encoder_2
        proj_dim = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
        cond = {"encoder_hidden_states": pos, "added_cond_kwargs": {"text_embeds": pooled}}
        uncond = {"encoder_hidden_states": neg, "added_cond_kwargs": {"text_embeds": neg_pooled}} if do_cfg else None
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=guidance_scale, extra={"projection_dim": proj_dim})

    def _forward(self, latents, t, kwargs, cond):
        """Adds the size micro-conditioning for the latents' own size (original = target, no crop)."""
        height, width = (d * self.vae_scale_factor for d in latents.shape[-2:])
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=kwargs["encoder_hidden_states"].dtype,
            text_encoder_projection_dim=cond.extra["projection_dim"],
        ).to(latents.device)  # fmt: skip
        added = {**kwargs["added_cond_kwargs"], "time_ids": time_ids.repeat(latents.shape[0], 1)}
        return super()._forward(latents, t, {**kwargs, "added_cond_kwargs": added}, cond)


class InstructPix2PixAdapter(UNetAdapter):
    """InstructPix2Pix: the source image's latents are concatenated to the noisy latents.

    Guidance has two scales (Brooks et al. 2023, eq. 3): ``eps = eps(0,0) +
    s_I (eps(I,0) - eps(0,0)) + s_T (eps(I,T) - eps(I,0))``, three branches run as one batch
    [text+image, image only, neither], exactly like the pipeline.
    """

    family = "instruct-pix2pix"
    pipeline_classes = ("StableDiffusionInstructPix2PixPipeline",)
    is_edit = True

    def encode_prompt(
        self,
        prompts,
        *,
        guidance_scale=7.5,
        negative_prompt=None,
        image: torch.Tensor | None = None,
        image_guidance_scale: float = 1.5,
        **kwargs,
    ) -> Conditioning:
        """``image``: source images float [B,3,H,W] in [0,1] (the instruction is the prompt)."""
        if image is None:
            raise ValueError("InstructPix2Pix needs the source image: pass image=[B,3,H,W] in [0,1]")
        do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        # The pipeline's private encoder returns [text, null, null] stacked when guidance is on.
        embeds = self.pipe._encode_prompt(prompt, self.device, 1, do_cfg, negative_prompt, **kwargs)
        pos, neg = embeds.chunk(3)[:2] if do_cfg else (embeds, None)
        source = image.to(self.device, pos.dtype) * 2 - 1
        latents = self.pipe.prepare_image_latents(source, pos.shape[0], 1, pos.dtype, self.device, False)
        return Conditioning(
            cond={"encoder_hidden_states": pos},
            uncond={"encoder_hidden_states": neg} if do_cfg else None,
            guidance_scale=guidance_scale,
            extra={"image_latents": latents, "image_guidance_scale": image_guidance_scale},
        )

    def predict(self, latents, schedule, i, cond, *, detach_uncond=False):
        t = schedule.timesteps[i]
        image_latents = cond.extra["image_latents"]
        with self._scheduler_at(i), self._forward_context():
            if not cond.do_cfg:
                return self._unet(latents, t, image_latents, cond.cond["encoder_hidden_states"])
            text = cond.cond["encoder_hidden_states"]
            null = cond.uncond["encoder_hidden_states"]
            zeros = torch.zeros_like(image_latents)
            if detach_uncond:
                out_text = self._unet(latents, t, image_latents, text)
                with torch.no_grad():
                    rest = self._unet(torch.cat([latents] * 2), t, torch.cat([image_latents, zeros]), torch.cat([null, null]))
                out_image, out_uncond = rest.chunk(2)
            else:
                out = self._unet(
                    torch.cat([latents] * 3), t, torch.cat([image_latents, image_latents, zeros]), torch.cat([text, null, null])
                )
                out_text, out_image, out_uncond = out.chunk(3)
        s_t, s_i = cond.guidance_scale, cond.extra["image_guidance_scale"]
        return out_uncond + s_t * (out_text - out_image) + s_i * (out_image - out_uncond)

    def _unet(self, latents, t, image_latents, text):
        x = torch.cat([self._scaled(latents, t), image_latents], dim=1)
        return self.denoiser(x, t, encoder_hidden_states=text, return_dict=False)[0]


__all__ = ["InstructPix2PixAdapter", "StableDiffusionAdapter", "StableDiffusionXLAdapter", "UNetAdapter"]
