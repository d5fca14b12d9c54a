"""The adapter surface shared by every model family: a denoiser we can step, score and differentiate.

An adapter wraps an ordinary diffusers pipeline (it owns no weights of its own) and exposes
the pieces of the pipeline's sampling loop one at a time::

    cond = adapter.encode_prompt(prompts, guidance_scale=7.5)
    sched = adapter.schedule(num_steps=30, height=512, width=512)
    x = adapter.prepare_latents(len(prompts), 512, 512, generator=generators)
    for i in range(len(sched)):
        out = adapter.predict(x, sched, i, cond)            # CFG-combined model output
        x = adapter.step(out, sched, i, x)                   # the pipeline's own scheduler step
    images = adapter.decode(x)                               # float [B,3,H,W] in [0,1]

Run in that order with the pipeline's scheduler, this is the pipeline's own loop: images
equal ``pipe(...)`` for the same seed. Algorithms also use the parts on their own:
``step_with_logprob`` (DDIM-eta or Flow-GRPO SDE/CPS, with the exact Gaussian log-density),
``pred_x0`` from any step, differentiable ``decode`` and ``encode_images``.

Latents are always image-shaped ``[B, C, h, w]`` (FLUX's packed sequence is packed and
unpacked inside ``predict``), so x0 estimates, noise and rewards look the same for every
family.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .attention import BACKENDS, apply_backend, attention_context, check_backend
from .steps import (
    Generator,
    Reduction,
    StepOutput,
    ddim_step_with_logprob,
    flow_cps_step_with_logprob,
    flow_sde_step_with_logprob,
    pred_x0_and_eps,
)

StochasticMethod = Literal["ddim", "sde", "cps"]


@dataclass
class Schedule:
    """The plan for one sampling run: N timesteps (as the denoiser receives them).

    ``sigmas`` (flow models, and Euler-type schedulers of epsilon/v models) has N+1 entries
    ending in 0: step ``i`` moves from ``sigmas[i]`` to ``sigmas[i+1]``. ``prev_timesteps`` (epsilon/v models) gives the
    timestep each step lands on (-1 for the final, clean sample).
    """

    timesteps: torch.Tensor
    height: int
    width: int
    sigmas: torch.Tensor | None = None
    prev_timesteps: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass
class Conditioning:
    """Encoded prompts (and source images for edit models) ready for ``predict``.

    ``cond`` / ``uncond`` are keyword arguments for the denoiser's conditional and
    unconditional branches; ``uncond`` is None when classifier-free guidance is off.
    ``extra`` holds family-specific tensors (e.g. source-image latents).
    """

    cond: dict[str, Any]
    uncond: dict[str, Any] | None = None
    guidance_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def do_cfg(self) -> bool:
        return self.uncond is not None


class DiffusionAdapter:
    """Base class. Subclasses set the class attributes and implement the ``_``-prefixed hooks."""

    family: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_name: ClassVar[str] = "unet"
    is_flow: ClassVar[bool] = False
    is_edit: ClassVar[bool] = False
    # Does the pipeline run CFG as one batched forward ([uncond, cond])? FLUX runs two.
    batched_cfg: ClassVar[bool] = True

    def __init__(self, pipe: Any, *, attention: str = "sdpa") -> None:
        self.pipe = pipe
        self.attention = "sdpa"
        self.vae_checkpointing = False
        self.set_attention_backend(attention)

    # ------------------------------------------------------------------ loading
    @classmethod
    def pipeline_type(cls) -> type:
        """The diffusers pipeline class this adapter wraps."""
        import diffusers

        return getattr(diffusers, cls.pipeline_classes[0])

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, attention: str = "sdpa", **kwargs: Any) -> DiffusionAdapter:
        """Load the family's pipeline from a local directory or a hub id (hub cache when offline)."""
        return cls(cls.pipeline_type().from_pretrained(path_or_id, **kwargs), attention=attention)

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self.pipe, self.denoiser_name, module)

    @property
    def vae(self) -> torch.nn.Module | None:
        return getattr(self.pipe, "vae", None)

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def prediction_type(self) -> str:
        """``"flow"`` (velocity), ``"epsilon"`` or ``"v_prediction"``."""
        if self.is_flow:
            return "flow"
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    def default_size(self) -> tuple[int, int]:
        """The pipeline's default (height, width)."""
        sample_size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        size = sample_size * self.vae_scale_factor
        return size, size

    # ------------------------------------------------------------------ placement & memory
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DiffusionAdapter:
        self.pipe.to(device=device, dtype=dtype)
        check_backend(self.attention, self.device, self.dtype)
        return self

    def set_attention_backend(self, name: str) -> None:
        """Use ``name`` (one of :data:`BACKENDS`) for every forward pass of this adapter."""
        check_backend(name, self.device, self.dtype)
        apply_backend(self.denoiser, name)
        self.attention = name

    def enable_gradient_checkpointing(self, vae: bool = True) -> None:
        """Checkpoint the denoiser's blocks (and, with ``vae``, the differentiable decode)."""
        self.denoiser.enable_gradient_checkpointing()
        self.vae_checkpointing = vae

    def compile(self, **kwargs: Any) -> None:
        """``torch.compile`` the denoiser; LoRA saving unwraps it again."""
        self.denoiser = torch.compile(self.denoiser, **kwargs)

    @contextlib.contextmanager
    def _forward_context(self) -> Iterator[None]:
        with attention_context(self.attention):
            yield

    # ------------------------------------------------------------------ conditioning
    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        *,
        guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Conditioning:
        """Encode prompts with the pipeline's own ``encode_prompt``.

        CFG is on when ``guidance_scale > 1`` (as in diffusers). Precomputed embeddings
        (``prompt_embeds=...`` etc.) pass straight through, as they do in ``pipe(...)``.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ schedule & latents
    def schedule(self, num_steps: int, *, height: int | None = None, width: int | None = None) -> Schedule:
        """Set the scheduler for ``num_steps`` and return the timesteps (and sigmas)."""
        height, width = self.check_size(height, width)
        timesteps = self._set_timesteps(num_steps, height, width)
        if self.is_flow:
            sigmas = self.scheduler.sigmas.to(torch.float32)
            return Schedule(timesteps, height, width, sigmas=sigmas)
        prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
        sigmas = None
        if float(getattr(self.scheduler, "init_noise_sigma", 1.0)) != 1.0:  # Euler-type: x = x0 + sigma * eps
            sigmas = self.scheduler.sigmas.to(torch.float32)
        return Schedule(timesteps, height, width, sigmas=sigmas, prev_timesteps=prev)

    def noise_level(self, schedule: Schedule, i: int) -> float:
        """Where step ``i`` starts between the clean sample (0) and pure noise (1).

        The flow models' sigma, or the epsilon/v models' timestep over the training horizon
        (``t / num_train_timesteps``): one axis on which every family's steps can be split
        into segments (timestep-segment DPO, the segment-routed sampler).
        """
        if self.is_flow:
            return float(schedule.sigmas[i])
        horizon = int(getattr(self.scheduler.config, "num_train_timesteps", 1000))
        return float(schedule.timesteps[i]) / horizon

    def _set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        timesteps, _ = retrieve_timesteps(self.scheduler, num_steps, self.device)
        return timesteps

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: Generator = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Initial noise exactly as the pipeline draws it (same generator -> same latents)."""
        raise NotImplementedError

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        factor = self.vae_scale_factor * (2 if self.is_flow and self.family.startswith("flux") else 1)
        if height % factor or width % factor:
            raise ValueError(f"height and width must be divisible by {factor} for {self.family}; got {height}x{width}")
        return height, width

    # ------------------------------------------------------------------ model prediction
    def predict(
        self,
        latents: torch.Tensor,
        schedule: Schedule,
        i: int,
        cond: Conditioning,
        *,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """Model output at step ``i`` (epsilon, v or velocity), with classifier-free guidance.

        ``detach_uncond`` runs the unconditional branch under ``no_grad`` (half the activation
        memory when backpropagating through a guided step; the gradient then flows only
        through the conditional branch).
        """
        t = schedule.timesteps[i]
        with self._forward_context():
            if not cond.do_cfg:
                return self._forward(latents, t, cond.cond, cond)
            if self.batched_cfg and not detach_uncond:
                both = self._forward(torch.cat([latents] * 2), t, _cat_kwargs(cond.uncond, cond.cond), cond)
                uncond_out, cond_out = both.chunk(2)
            else:
                cond_out = self._forward(latents, t, cond.cond, cond)
                with torch.no_grad() if detach_uncond else contextlib.nullcontext():
                    uncond_out = self._forward(latents, t, cond.uncond, cond)
            return self._combine_guidance(uncond_out, cond_out, cond)

    def _combine_guidance(self, uncond_out: torch.Tensor, cond_out: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return uncond_out + cond.guidance_scale * (cond_out - uncond_out)

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any], cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def step(
        self, model_output: torch.Tensor, schedule: Schedule, i: int, latents: torch.Tensor, generator: Generator = None
    ) -> torch.Tensor:
        """Deterministic step: exactly the pipeline's scheduler step from step ``i`` to ``i+1``.

        Single-step schedulers (DDIM, DDPM, Euler, flow-matching Euler) may be stepped from any
        index; multistep ones (DPM-Solver, UniPC, DEIS, PNDM, LMS, Heun) build each step on
        the earlier ones, so a step out of order raises instead of silently using the wrong history.
        """
        scheduler = self.scheduler
        self._seek_step(i)
        kwargs = {}
        params = inspect.signature(scheduler.step).parameters
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = 0.0
        return scheduler.step(model_output, schedule.timesteps[i], latents, return_dict=False, **kwargs)[0]

    def _seek_step(self, i: int) -> None:
        """Point the scheduler at step ``i``; a multistep scheduler only accepts its next step."""
        scheduler = self.scheduler
        if _keeps_history(scheduler):
            expected = _next_step_index(scheduler)
            if i != expected:
                begin = getattr(scheduler, "begin_index", None) or 0
                got = "as the first step" if expected == begin else f"after step {expected - 1}"
                single, alt = ("flow-euler", "") if self.is_flow else ("ddim", " (or 'euler')")
                raise ValueError(
                    f"{type(scheduler).__name__} is a multistep solver: steps must run in order {begin}, {begin + 1}, "
                    f"{begin + 2}, ... from adapter.schedule(); got step {i} {got}; methods that start or skip "
                    f"mid-schedule need a single-step scheduler: adapter.set_scheduler('{single}'){alt}, "
                    f"model.scheduler={single} in a recipe"
                )
        if hasattr(scheduler, "_step_index") and scheduler.timesteps is not None:
            scheduler._step_index = i

    @contextlib.contextmanager
    def _scheduler_at(self, i: int) -> Iterator[None]:
        """The scheduler's index at ``i`` while it scales the model input (Euler-type scaling reads it).

        A multistep scheduler's index is its place in its history, so it is put back: predicting
        at any step is fine, only stepping out of order is refused (:meth:`step`).
        """
        scheduler = self.scheduler
        if not hasattr(scheduler, "_step_index"):
            yield
            return
        saved = scheduler._step_index
        scheduler._step_index = i
        try:
            yield
        finally:
            if _keeps_history(scheduler):
                scheduler._step_index = saved

    def step_with_logprob(
        self,
        model_output: torch.Tensor,
        schedule: Schedule,
        i: int,
        latents: torch.Tensor,
        *,
        method: StochasticMethod | None = None,
        noise_level: float | None = None,
        generator: Generator = None,
        prev_sample: torch.Tensor | None = None,
        reduce: Reduction = "mean",
    ) -> StepOutput:
        """Stochastic step with the exact Gaussian log-probability of the transition.

        Flow models: ``method="sde"`` (Flow-GRPO, default, ``noise_level`` a = 0.7) or
        ``"cps"``. Epsilon/v models: ``"ddim"`` with ``noise_level`` = eta (default 1.0);
        it needs a variance-preserving scheduler (``init_noise_sigma == 1``; call
        ``set_scheduler("ddim")`` for Euler-type ones).
        """
        if self.is_flow:
            method = method or "sde"
            noise_level = 0.7 if noise_level is None else noise_level
            sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            if method == "sde":
                return flow_sde_step_with_logprob(
                    model_output, latents, sigma, sigma_next, noise_level=noise_level,
                    sigma_max=float(schedule.sigmas[1]), generator=generator, prev_sample=prev_sample, reduce=reduce,
                )  # fmt: skip
            if method == "cps":
                return flow_cps_step_with_logprob(
                    model_output, latents, sigma, sigma_next, noise_level=noise_level,
                    generator=generator, prev_sample=prev_sample, reduce=reduce,
                )  # fmt: skip
            raise ValueError(f"flow models support method 'sde' or 'cps', not {method!r}")
        method = method or "ddim"
        if method != "ddim":
            raise ValueError(f"{self.family} ({self.prediction_type}) supports method 'ddim', not {method!r}")
        self._require_vp_scheduler()
        a_t, a_prev = self._alphas(schedule, i)
        return ddim_step_with_logprob(
            model_output, latents, a_t, a_prev, eta=1.0 if noise_level is None else noise_level,
            prediction_type=self.prediction_type, generator=generator, prev_sample=prev_sample, reduce=reduce,
        )  # fmt: skip

    def pred_x0(self, model_output: torch.Tensor, schedule: Schedule, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The model's estimate of the clean latent from step ``i`` (differentiable)."""
        if self.is_flow:
            sigma = schedule.sigmas[i].to(latents.device)
            return (latents.float() - sigma * model_output.float()).to(latents.dtype)
        if schedule.sigmas is not None:  # sigma-scaled (Karras/Euler) space
            sigma = schedule.sigmas[i].to(latents.device)
            x, out = latents.float(), model_output.float()
            if self.prediction_type == "epsilon":
                x0 = x - sigma * out
            else:  # v-prediction in sigma space (Karras et al. 2022, table 1 with c_skip/c_out)
                x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
            return x0.to(latents.dtype)
        a_t, _ = self._alphas(schedule, i)
        x0, _ = pred_x0_and_eps(model_output.float(), latents.float(), a_t, self.prediction_type)
        return x0.to(latents.dtype)

    def _alphas(self, schedule: Schedule, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        alphas = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        t, t_prev = int(schedule.timesteps[i]), int(schedule.prev_timesteps[i])
        final = getattr(self.scheduler, "final_alpha_cumprod", alphas[0])
        a_prev = alphas[t_prev] if t_prev >= 0 else torch.as_tensor(final, dtype=torch.float32, device=self.device)
        return alphas[t], a_prev

    def _require_vp_scheduler(self) -> None:
        if float(getattr(self.scheduler, "init_noise_sigma", 1.0)) != 1.0:
            raise ValueError(
                f"{type(self.scheduler).__name__} works in sigma-scaled space; stochastic DDIM steps and x0 "
                "need a variance-preserving scheduler: call adapter.set_scheduler('ddim') first"
            )

    def set_scheduler(self, name_or_scheduler: str | Any) -> None:
        """Swap the pipeline's scheduler (``"ddim"``, ``"ddpm"``, ``"euler"`` or an instance)."""
        import diffusers

        if isinstance(name_or_scheduler, str):
            names = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                     "flow-euler": "FlowMatchEulerDiscreteScheduler"}  # fmt: skip
            if name_or_scheduler not in names:
                raise ValueError(f"unknown scheduler {name_or_scheduler!r}; choose one of {', '.join(names)}")
            cls = getattr(diffusers, names[name_or_scheduler])
            name_or_scheduler = cls.from_config(self.scheduler.config)
        self.pipe.scheduler = name_or_scheduler

    # ------------------------------------------------------------------ VAE
    def decode(self, latents: torch.Tensor, *, checkpoint: bool | None = None) -> torch.Tensor:
        """Differentiable decode to images in [0, 1] (float32), as the pipeline's postprocess.

        ``checkpoint`` (default: on when gradient checkpointing was enabled) recomputes the
        VAE decoder in the backward pass instead of storing its activations.
        """
        vae = self.vae
        if vae is None:  # pixel-space model: the latent is the image in [-1, 1]
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        scaled = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        scaled = scaled.to(vae.dtype)

        def run(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z, return_dict=False)[0]

        use_ckpt = self.vae_checkpointing if checkpoint is None else checkpoint
        if use_ckpt and torch.is_grad_enabled():
            image = activation_checkpoint(run, scaled, use_reentrant=False)
        else:
            image = run(scaled)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: Generator = None, *, sample: bool = True) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (a draw from the VAE posterior, or its mode)."""
        vae = self.vae
        x = images.to(self.device, vae.dtype if vae is not None else self.dtype) * 2 - 1
        if vae is None:
            return x
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor

    # ------------------------------------------------------------------ full loop
    def sample(
        self,
        prompts: str | Sequence[str],
        *,
        num_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        generator: Generator = None,
        negative_prompt: str | Sequence[str] | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        **cond_kwargs: Any,
    ) -> torch.Tensor:
        """The pipeline's deterministic loop through the adapter; images [B,3,H,W] in [0,1]."""
        with torch.no_grad():
            cond = self.encode_prompt(prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt, **cond_kwargs)
            sched = self.schedule(num_steps, height=height, width=width)
            if latents is None:
                latents = self.prepare_latents(cond_batch_size(cond), sched.height, sched.width, generator)
            for i in range(len(sched)):
                out = self.predict(latents, sched, i, cond)
                latents = self.step(out, sched, i, latents, generator)
                if callback is not None:
                    callback(i, latents)
            return self.decode(latents)


# Where diffusers schedulers keep earlier model outputs: DPM-Solver, UniPC, DEIS, SA-Solver
# (model_outputs), PNDM (ets), LMS (derivatives). Two-stage ones (Heun, KDPM2) have order 2.
_HISTORY_ATTRIBUTES = ("model_outputs", "ets", "derivatives")


def _keeps_history(scheduler: Any) -> bool:
    """Does a step of ``scheduler`` depend on the steps before it (so it must run in order)?"""
    return getattr(scheduler, "order", 1) > 1 or any(hasattr(scheduler, name) for name in _HISTORY_ATTRIBUTES)


def _next_step_index(scheduler: Any) -> int:
    """The index a multistep scheduler will step next (it resets on ``set_timesteps``)."""
    if not hasattr(scheduler, "step_index"):  # PNDM counts its calls instead
        return int(getattr(scheduler, "counter", 0))
    if scheduler.step_index is not None:
        return int(scheduler.step_index)
    return getattr(scheduler, "begin_index", None) or 0


def cond_batch_size(cond: Conditioning) -> int:
    """Number of images the conditioning describes."""
    for value in cond.cond.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return value.shape[0]
    raise ValueError("conditioning has no batched tensor")


def _cat_kwargs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two branches' keyword arguments along the batch (tensors with a batch dim)."""
    out = {}
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, torch.Tensor) and va.ndim >= 1 and key not in _UNBATCHED_KEYS:
            out[key] = torch.cat([va, vb])
        elif isinstance(va, dict):
            out[key] = _cat_kwargs(va, vb)
        else:
            out[key] = va
    return out


_UNBATCHED_KEYS = {"txt_ids", "img_ids"}

__all__ = ["BACKENDS", "Conditioning", "DiffusionAdapter", "Schedule", "StepOutput", "cond_batch_size"]
