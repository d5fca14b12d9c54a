"""Policy-gradient losses for denoising chains: group advantages, PPO-clip and the step KL.

A sampling chain is a sequence of Gaussian transitions ``x_{t-1} ~ N(mu_theta(x_t), std_t^2)``
(DDIM-eta for epsilon/v models, Flow-GRPO's SDE or CPS step for flow models), so a reward on
the final image can be optimised as an MDP with one action per step (Black et al. 2023,
"Training Diffusion Models with Reinforcement Learning", DDPO, §4.2; Liu et al. 2025,
"Flow-GRPO", §3). These functions take the per-step log-probabilities and means that
:mod:`pipelines.steps` computes, and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def group_advantages(scores: torch.Tensor, clip: float | None = 5.0, *, std: Literal["group", "global"] = "group",
                     eps: float = 1e-4) -> torch.Tensor:  # fmt: skip
    """GRPO's advantages ``(r - mean_group) / (std + eps)``, clipped to ``[-clip, clip]``.

    ``scores`` is ``[prompts, G]``: row ``p`` is the group of G images of prompt ``p``.
    ``std="group"`` divides by each group's own standard deviation (Shao et al. 2024, DeepSeekMath
    eq. 3; Flow-GRPO's per-prompt stat tracker); ``"global"`` by the standard deviation of all
    scores (Flow-GRPO's ``global_std`` option, which keeps near-constant groups from being
    blown up to unit scale). ``eps = 1e-4`` and the clip of 5 are Flow-GRPO's. A group whose
    scores are all equal gets advantage 0: it contributes no gradient.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [prompts, group], got shape {tuple(scores.shape)}")
    scores = scores.float()
    centred = scores - scores.mean(1, keepdim=True)
    spread = scores.std(1, unbiased=False, keepdim=True) if std == "group" else scores.std(unbiased=False)
    advantages = centred / (spread + eps)
    return advantages if clip is None else advantages.clamp(-clip, clip)


@dataclass
class PpoClipOutput:
    loss: torch.Tensor  # scalar
    ratio: torch.Tensor  # [B], detached
    clipped: torch.Tensor  # [B] bool: the clipped branch was the one taken (no gradient)


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float) -> PpoClipOutput:  # fmt: skip
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(log_prob - old_log_prob)``; the per-sample loss is
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``, averaged over the batch. On the
    first update after a rollout the ratio is exactly 1 and the gradient is the plain policy
    gradient ``-A * grad log_prob``. ``clipped`` marks the samples whose gradient the clip removed.
    """
    ratio = torch.exp(log_prob.float() - old_log_prob.float().detach())
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    return PpoClipOutput(per_sample.mean(), ratio.detach(), (clipped > unclipped).detach())


def step_mean_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL between two Gaussian steps that share the variance: ``||mu - mu_ref||^2 / (2 std^2)`` per sample.

    Flow-GRPO's KL regulariser (``kl = ((mean - mean_ref)^2).mean(dims) / (2 std^2)``): for
    ``N(mu, s^2 I)`` and ``N(mu_ref, s^2 I)`` the KL is exactly this, summed over dimensions;
    here averaged over dimensions like the log-probs. ``std`` is the step's standard deviation
    (per sample ``[B]`` or a scalar). A deterministic step (``std == 0``: CPS's last step) has
    no stochastic policy to regularise and contributes 0. Returns ``[B]``.
    """
    diff = (mean.float() - reference_mean.float()) ** 2
    per_sample = diff.mean(dim=tuple(range(1, diff.ndim)))
    std = torch.as_tensor(std, dtype=torch.float32, device=per_sample.device).flatten()
    if std.numel() > 1:
        std = std.view(std.shape[0], -1)[:, 0]  # a per-sample std broadcast over C,H,W
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, per_sample / (2 * safe**2), torch.zeros_like(per_sample))


__all__ = ["PpoClipOutput", "group_advantages", "ppo_clip_loss", "step_mean_kl"]
