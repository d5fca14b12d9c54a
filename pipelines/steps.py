"""Stochastic sampler steps that also return the exact log-probability of the transition.

Policy-gradient methods (DDPO, Flow-GRPO) need, for every denoising step, the density of the
sample actually drawn under the current model. Each step here is a Gaussian transition
``x_next ~ N(mean, std^2 I)``; it returns the drawn sample, its log-density, the mean and the
std. Everything is computed in float32 (bf16 overflows in the mean, and rollout/training
log-probs must agree), whatever the dtype of the inputs.

Reduction: ``reduce="mean"`` (default, DDPO's and Flow-GRPO's convention) averages the
per-element log-density over all non-batch dimensions; ``reduce="sum"`` gives the log-density
of the whole latent. Both are exact Gaussian log-densities, including the normalising
constant, so ``exp(logp_new - logp_old)`` ratios are correct under either reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

Reduction = Literal["mean", "sum"]
Generator = torch.Generator | list[torch.Generator] | None


@dataclass
class StepOutput:
    """Result of one stochastic step: ``prev_sample ~ N(mean, std^2)`` and its log-density."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # [B], float32
    mean: torch.Tensor  # float32
    std: torch.Tensor  # float32, broadcastable to mean


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduce: Reduction = "mean"
) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)`` per element, reduced over non-batch dims.

    Elements with ``std == 0`` are deterministic transitions and contribute 0.
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).expand_as(x)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    log_p = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    log_p = torch.where(std > 0, log_p, torch.zeros_like(log_p))
    dims = tuple(range(1, log_p.ndim))
    return log_p.mean(dim=dims) if reduce == "mean" else log_p.sum(dim=dims)


def _draw(mean: torch.Tensor, std: torch.Tensor, generator: Generator, like: torch.Tensor) -> torch.Tensor:
    noise = randn_tensor(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return mean + std * noise


def _finish(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: Generator,
    like: torch.Tensor,
    reduce: Reduction,
) -> StepOutput:
    if prev_sample is None:
        prev_sample = _draw(mean, std, generator, like)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduce)
    return StepOutput(prev_sample.to(like.dtype), log_prob, mean, std)


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    alpha_prod_t_prev: torch.Tensor | float,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """DDIM step with noise ``eta`` (Song et al. 2021, eq. 12), as used by DDPO.

    ``sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))`` and
    ``mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat``, where ``a`` is
    the cumulative alpha product. ``eta = 0`` is deterministic DDIM (log-prob 0);
    ``eta = 1`` is DDPM's posterior variance. ``prediction_type`` is ``"epsilon"``,
    ``"v_prediction"`` or ``"sample"``. Pass ``prev_sample`` to score a given transition.
    """
    x = sample.float()
    out = model_output.float()
    a_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=x.device)
    a_prev = torch.as_tensor(alpha_prod_t_prev, dtype=torch.float32, device=x.device)
    if a_t.ndim:  # per-sample alphas: broadcast over C,H,W
        a_t = a_t.view(-1, *([1] * (x.ndim - 1)))
    if a_prev.ndim:
        a_prev = a_prev.view(-1, *([1] * (x.ndim - 1)))
    x0, eps = pred_x0_and_eps(out, x, a_t, prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return _finish(mean, std, prev_sample, generator, sample, reduce)


def pred_x0_and_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean-sample and noise estimates from an epsilon / v / sample prediction (VP space)."""
    a, s = alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * sample - s * model_output
        eps = a * model_output + s * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a * x0) / s
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")
    return x0, eps


def flow_sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float = 0.7,
    sigma_max: float | None = None,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """Flow-GRPO's SDE step for rectified-flow models (Liu et al. 2025, "Flow-GRPO", eq. 9).

    With ``x_t = (1 - sigma) x0 + sigma * noise`` and velocity ``v = noise - x0``, the reverse
    SDE with the same marginals as the ODE gives, for ``dt = sigma_next - sigma < 0``::

        std_t = a * sqrt(sigma / (1 - sigma))
        mean  = x + v*dt + std_t^2 / (2 sigma) * (x + (1 - sigma) v) * dt
        x'    = mean + std_t * sqrt(-dt) * eps

    ``a`` is ``noise_level``. At ``sigma == 1`` (the first step of every flow schedule) the
    ratio is infinite; like Flow-GRPO (``sd3_sde_with_logprob.py``: ``sigma_max =
    self.sigmas[1]``, ``1 - where(sigma == 1, sigma_max, sigma)``) we put ``sigma_max``, the
    schedule's second sigma, in the denominator instead. ``sigma_max=None`` takes it from
    ``sigma_next``, which at a step from sigma 1 *is* the schedule's second sigma; pass it
    explicitly when a step from sigma 1 skips ahead (lands below the second sigma).
    """
    if sigma_max is not None and not 0 <= sigma_max < 1:
        raise ValueError(f"sigma_max must be in [0, 1) (the schedule's second sigma), got {sigma_max}")
    x = sample.float()
    v = velocity.float()
    sigma = _as_batch(sigma, x)
    sigma_next = _as_batch(sigma_next, x)
    dt = sigma_next - sigma
    cap = sigma_next if sigma_max is None else torch.full_like(sigma, sigma_max)
    denom_sigma = torch.where(sigma >= 1, cap, sigma)
    std_t = noise_level * torch.sqrt(sigma / (1 - denom_sigma).clamp(min=1e-12))
    mean = x + v * dt + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v) * dt
    std = std_t * torch.sqrt(-dt)
    return _finish(mean, std, prev_sample, generator, sample, reduce)


def flow_cps_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    noise_level: float = 0.7,
    generator: Generator = None,
    prev_sample: torch.Tensor | None = None,
    reduce: Reduction = "mean",
) -> StepOutput:
    """Coefficients-preserving sampling step (CPS; Flow-GRPO's ``sde_type="cps"``).

    ``x0 = x - sigma v`` and ``x1 = x + (1 - sigma) v`` are the model's clean and noise
    estimates; the next sample re-mixes them so that the total noise variance stays exactly
    ``sigma_next^2``::

        std  = sigma_next * sin(a * pi / 2)
        mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1

    Flow-GRPO's code keeps only ``-(x' - mean)^2`` as the "log-prob"; here it is the exact
    Gaussian log-density (so PPO ratios are those of the actual transition). At the last step
    (``sigma_next = 0``) the transition is deterministic and its log-prob is 0.
    """
    x = sample.float()
    v = velocity.float()
    sigma = _as_batch(sigma, x)
    sigma_next = _as_batch(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0 = x - sigma * v
    x1 = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + torch.sqrt((sigma_next**2 - std**2).clamp(min=0)) * x1
    return _finish(mean, std, prev_sample, generator, sample, reduce)


def _as_batch(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] value as float32 broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1))) if t.ndim else t
