"""The forward (noising) process on an adapter's sampling schedule, and its training target.

Trainers that start from a *clean* latent (ImageReFL's real images, DRaFT-LV's re-noising,
a pre-training loss, later Diffusion-DPO) need ``x_i`` at step ``i`` of a
:class:`pipelines.Schedule` and the model output that would denoise it exactly. The three
parameterisations the adapters use:

* variance preserving (DDIM/DDPM): ``x = sqrt(a_t) x0 + sqrt(1 - a_t) eps``;
* sigma-scaled (Euler-type schedulers of epsilon/v models, e.g. SDXL, InstructPix2Pix):
  ``x = x0 + sigma_i eps`` (the model input is rescaled inside ``adapter.predict``);
* rectified flow (SD3, FLUX): ``x = (1 - sigma_i) x0 + sigma_i eps``.

Noising on the sampling schedule (rather than at any of the 1000 training timesteps) keeps
``adapter.predict`` / ``adapter.pred_x0`` valid at that step for every scheduler: the
consistency test is ``pred_x0(target(x0, eps), x_i) == x0``.
"""

from __future__ import annotations

import torch

from pipelines import DiffusionAdapter, Schedule

from ..losses.reward_backprop import denoising_target

__all__ = ["alpha_prod_at", "noise_to_step", "target_at_step"]


def alpha_prod_at(adapter: DiffusionAdapter, schedule: Schedule, i: int) -> torch.Tensor:
    """Cumulative alpha of the timestep at step ``i`` (epsilon / v models)."""
    alphas = adapter.scheduler.alphas_cumprod.to(torch.float32)
    return alphas[int(schedule.timesteps[i])].to(adapter.device)


def noise_to_step(
    adapter: DiffusionAdapter, schedule: Schedule, i: int, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``x_i`` from the clean latent ``x0`` and standard normal ``noise``."""
    x0f, nf = x0.float(), noise.float().to(x0.device)
    if adapter.is_flow:
        sigma = schedule.sigmas[i].to(x0.device)
        x = (1 - sigma) * x0f + sigma * nf
    elif schedule.sigmas is not None:
        x = x0f + schedule.sigmas[i].to(x0.device) * nf
    else:
        a = alpha_prod_at(adapter, schedule, i)
        x = a.sqrt() * x0f + (1 - a).sqrt() * nf
    return x.to(x0.dtype)


def target_at_step(
    adapter: DiffusionAdapter, schedule: Schedule, i: int, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """The denoiser output that maps ``noise_to_step(..., x0, noise)`` back to ``x0``."""
    prediction_type = adapter.prediction_type
    alpha = alpha_prod_at(adapter, schedule, i) if prediction_type == "v_prediction" else None
    return denoising_target(prediction_type, x0.float(), noise.float().to(x0.device), alpha)
