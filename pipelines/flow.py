"""Rectified-flow families: SD3 / SD3.5, FLUX.1 and FLUX.1 Kontext (editing).

The model predicts a velocity ``v = noise - x0`` and ``x_t = (1 - sigma) x0 + sigma noise``;
the pipelines' scheduler is ``FlowMatchEulerDiscreteScheduler``. As for the UNet families,
each adapter calls the pipeline's own helpers and repeats its loop body, so the
deterministic loop reproduces ``pipe(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .adapter import Conditioning, DiffusionAdapter


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _calculate_shift(image_seq_len: int, config, default_max_shift: float = 1.15) -> float:
    """Resolution-dependent timestep shift mu (FLUX/SD3.5 "dynamic shifting").

    The pipelines differ only in the fallback ``max_shift`` (FLUX 1.15, SD3 1.16).
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", default_max_shift),
    )


class FlowAdapter(DiffusionAdapter):
    is_flow = True
    denoiser_name = "transformer"

    def step(self, model_output, schedule, i, latents, generator=None):
        """The scheduler step as the flow pipelines call it: without a generator."""
        self._seek_step(i)
        return self.scheduler.step(model_output, schedule.timesteps[i], latents, return_dict=False)[0]


class StableDiffusion3Adapter(FlowAdapter):
    """SD3 / SD3.5 (MMDiT), three text encoders, batched CFG like SD."""

    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)

    def encode_prompt(self, prompts, *, guidance_scale=7.0, negative_prompt=None, **kwargs) -> Conditioning:
        do_cfg = guidance_scale > 1.0
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg, device=self.device, num_images_per_prompt=1, **kwargs,
        )  # fmt: skip
        return Conditioning(
            cond={"encoder_hidden_states": pos, "pooled_projections": pooled},
            uncond={"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if do_cfg else None,
            guidance_scale=guidance_scale,
        )

    def _set_timesteps(self, num_steps, height, width):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            seq_len = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
            kwargs["mu"] = _calculate_shift(seq_len, self.scheduler.config, default_max_shift=1.16)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_steps, self.device, **kwargs)
        return timesteps

    def prepare_latents(self, batch_size, height, width, generator=None, dtype=None):
        return self.pipe.prepare_latents(
            batch_size, self.denoiser.config.in_channels, height, width, dtype or self.dtype, self.device, generator
        )

    def _forward(self, latents, t, kwargs, cond):
        timestep = t.expand(latents.shape[0])
        return self.denoiser(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]


class FluxAdapter(FlowAdapter):
    """FLUX.1 [dev]/[schnell]: packed 2x2 latent patches, guidance-distilled.

    ``guidance_scale`` is the distilled guidance fed to the transformer (FLUX.1-dev: 3.5);
    true classifier-free guidance (two forwards) is on when ``true_cfg_scale > 1`` and a
    ``negative_prompt`` is given, as in ``FluxPipeline``.
    """

    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    batched_cfg = False

    def encode_prompt(
        self, prompts, *, guidance_scale=3.5, negative_prompt=None, true_cfg_scale: float = 1.0, **kwargs
    ) -> Conditioning:
        prompt = None if "prompt_embeds" in kwargs else _as_list(prompts)
        neg_embeds = {k[len("negative_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("negative_")}
        pos, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.device, **kwargs)
        extra = {"guidance": None}
        if self.denoiser.config.guidance_embeds:
            extra["guidance"] = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32)
        cond = {"encoder_hidden_states": pos, "pooled_projections": pooled}
        do_cfg = true_cfg_scale > 1 and (negative_prompt is not None or neg_embeds)
        uncond = None
        if do_cfg:
            neg_prompt = None if neg_embeds else _as_list(negative_prompt)
            neg, neg_pooled, _ = self.pipe.encode_prompt(prompt=neg_prompt, prompt_2=None, device=self.device, **neg_embeds)
            uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
        return Conditioning(cond=cond, uncond=uncond, guidance_scale=true_cfg_scale, extra=extra)

    def _set_timesteps(self, num_steps, height, width):
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if self.scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        seq_len = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        mu = _calculate_shift(seq_len, self.scheduler.config)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def prepare_latents(self, batch_size, height, width, generator=None, dtype=None):
        channels = self.denoiser.config.in_channels // 4
        packed, _ = self.pipe.prepare_latents(
            batch_size, channels, height, width, dtype or self.dtype, self.device, generator
        )
        return self.unpack(packed, height, width)

    def unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, seq, C*4] -> [B, C, h, w] latents (the layout every other adapter uses)."""
        return self.pipe._unpack_latents(packed, height, width, self.vae_scale_factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _ids(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = latents.shape
        return self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)

    def _forward(self, latents, t, kwargs, cond):
        b, c, h, w = latents.shape
        packed = self.pack(latents)
        hidden, ids = self._model_inputs(packed, latents, cond)
        timestep = t.expand(b).to(latents.dtype)
        guidance = cond.extra["guidance"]
        text_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        out = self.denoiser(
            hidden_states=hidden, timestep=timestep / 1000, guidance=None if guidance is None else guidance.expand(b),
            txt_ids=text_ids, img_ids=ids, return_dict=False, **kwargs,
        )[0]  # fmt: skip
        out = out[:, : packed.shape[1]]
        return self.unpack(out, h * self.vae_scale_factor, w * self.vae_scale_factor)

    def _model_inputs(self, packed, latents, cond):
        return packed, self._ids(latents, cond)


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext: the source image's packed latents are appended to the sequence.

    Source tokens carry position ids with first coordinate 1; the model's output for them is
    discarded. The source image is used at its own size (a multiple of 16), unlike the
    pipeline's default auto-resize to a preferred resolution (``_auto_resize=False``), and the
    output has the requested size (the pipeline rescales it to ``max_area``, 1024^2 by default).
    """

    family = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    is_edit = True

    def encode_prompt(self, prompts, *, guidance_scale=2.5, negative_prompt=None, image=None, **kwargs) -> Conditioning:
        if image is None:
            raise ValueError("FLUX Kontext needs the source image: pass image=[B,3,H,W] in [0,1]")
        cond = super().encode_prompt(prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt, **kwargs)
        batch = cond.cond["encoder_hidden_states"].shape[0]
        source = self.pipe.image_processor.preprocess(image.float(), image.shape[-2], image.shape[-1])
        latents = self.pipe._encode_vae_image(source.to(self.device, self.dtype), generator=None)
        if latents.shape[0] != batch:
            latents = latents.repeat(batch // latents.shape[0], 1, 1, 1)
        b, c, h, w = latents.shape
        ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        ids[..., 0] = 1
        cond.extra.update(image_latents=self.pipe._pack_latents(latents, b, c, h, w), image_ids=ids)
        return cond

    def prepare_latents(self, batch_size, height, width, generator=None, dtype=None):
        channels = self.denoiser.config.in_channels // 4
        packed, *_ = self.pipe.prepare_latents(
            None, batch_size, channels, height, width, dtype or self.dtype, self.device, generator
        )
        return self.unpack(packed, height, width)

    def _model_inputs(self, packed, latents, cond):
        image_latents = cond.extra["image_latents"]
        if image_latents.shape[0] != packed.shape[0]:  # batched CFG is off, but keep shapes honest
            raise ValueError("source image batch does not match the latents batch")
        hidden = torch.cat([packed, image_latents.to(packed.dtype)], dim=1)
        ids = torch.cat([self._ids(latents, cond), cond.extra["image_ids"].to(packed.dtype)], dim=0)
        return hidden, ids


__all__ = ["FluxAdapter", "FluxKontextAdapter", "StableDiffusion3Adapter"]
