"""Reward-backpropagation objectives: ReFL, DRaFT(-K/-LV), AlignProp truncation, ImageReFL.

Everything here is a pure function of tensors (rewards, model outputs, targets) or of a
random generator, so each objective can be checked against its paper by hand. The trainers
in :mod:`imgalign.train.reward_backprop` decide *which* denoising steps carry gradient and
call these to turn rewards into a scalar loss.

Sources (equations are written out in each docstring; the section is where they appear):

* ReFL — Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
  Text-to-Image Generation" (NeurIPS 2023), §4 and Algorithm 1; the published script is
  ``THUDM/ImageReward:ImageReward/ReFL.py``.
* DRaFT — Clark, Vicol, Swersky, Fleet 2024, "Directly Fine-Tuning Diffusion Models on
  Differentiable Rewards" (ICLR 2024), §3 (DRaFT, DRaFT-K, DRaFT-LV; Algorithms 1-2).
* AlignProp — Prabhudesai, Goyal, Pathak, Fragkiadaki 2023, "Aligning Text-to-Image
  Diffusion Models with Reward Backpropagation", §3 (randomised truncated backprop).
* ImageReFL — Sorokin, Nakhodnov, Kuznetsov, Alanov 2025, "ImageReFL: Balancing Quality and
  Diversity in Human-Aligned Diffusion Models", arXiv:2505.22569, §4 (ImageReFL loss); the
  published code is ``ControlGenAI/ImageReFL``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "alignprop_truncation_step",
    "denoising_loss",
    "denoising_target",
    "draft_loss",
    "draft_lv_loss",
    "imagerefl_loss",
    "refl_loss",
    "refl_stop_step",
]


# ----------------------------------------------------------------------------- step choice
def refl_stop_step(window: Sequence[int], rng: random.Random) -> int:
    """The step at which ReFL stops sampling and takes its one gradient step.

    ImageReward's ReFL draws ``t ~ U{30, ..., 39}`` of 40 DDPM steps (Xu et al. 2023, §4:
    "the reward of x'_0 predicted from a late step t ∈ [T1, T2]"); ``window`` is that
    inclusive range of step indices.
    """
    lo, hi = int(window[0]), int(window[1])
    if lo > hi:
        raise ValueError(f"window must be [low, high] with low <= high, got {list(window)}")
    return rng.randint(lo, hi)


def alignprop_truncation_step(mean: float, std: float, num_steps: int, rng: random.Random) -> int:
    """AlignProp's randomised truncation: the first step that carries gradient.

    Prabhudesai et al. 2023, §3: ``K ~ N(mu, sigma^2)`` (42 and 5 of 50 steps in their code),
    rounded and clipped to a valid step; every step from ``K`` on is backpropagated through,
    earlier predictions are detached. Returns an index in ``[0, num_steps - 1]``.
    """
    step = round(rng.gauss(mean, std))
    return min(max(step, 0), num_steps - 1)


# ----------------------------------------------------------------------------- reward losses
def refl_loss(rewards: Tensor, *, margin: float | None = 2.0, scale: float = 1e-3) -> Tensor:
    """ReFL loss ``L_reward = lambda * E[phi(r(y, g_theta(y)))]`` (Xu et al. 2023, §4).

    The published choice is ``phi(r) = ReLU(margin - r)`` with ``margin = 2`` and
    ``lambda = 1e-3`` (``ReFL.py``: ``F.relu(-rewards + 2) * 1e-3``): once an image scores
    above the margin it stops contributing. ``margin=None`` gives the plain linear
    objective ``-lambda * r``.
    """
    rewards = rewards.float()
    per_image = -rewards if margin is None else torch.relu(margin - rewards)
    return scale * per_image.mean()


def draft_loss(rewards: Tensor, *, scale: float = 1.0) -> Tensor:
    """DRaFT / DRaFT-K / AlignProp loss ``-r(x_0, c)`` (Clark et al. 2024, §3, Alg. 1).

    The gradient reaches the parameters only through the steps the trainer kept in the graph
    (the last K for DRaFT-K, the steps after the random truncation for AlignProp).
    """
    return -scale * rewards.float().mean()


def draft_lv_loss(rewards: Tensor, *, scale: float = 1.0) -> Tensor:
    """DRaFT-LV: average the reward over ``n`` re-noisings of the final sample.

    Clark et al. 2024, §3 (Alg. 2): ``x_0`` is sampled without gradient; for
    ``i = 1..n``, ``x_1^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i`` and the loss is
    ``-(1/n) sum_i r(x0_hat(x_1^i))``, a lower-variance estimate of the K = 1 gradient.
    ``rewards`` is ``[n, B]`` (or flat ``[n*B]``); the mean over both is the same number.
    """
    return -scale * rewards.float().mean()


def imagerefl_loss(
    rewards: Tensor,
    denoising_mse: Tensor | None = None,
    *,
    reward_scale: float = 1.0,
    reward_offset: float = 0.0,
    mse_weight: float = 0.01,
    scale: float = 1e-3,
    feature_similarity: Tensor | None = None,
    feature_weight: float = 0.0,
) -> Tensor:
    """ImageReFL loss (Sorokin et al. 2025, arXiv:2505.22569, §4)::

        L = scale * [ -(r + offset) * reward_scale + mse_weight * ||eps_theta(x_t) - eps||^2 ]
            - feature_weight * sim(x0_hat, x_real)

    ``r`` is the reward of the x0 predicted from the gradient step; the MSE is the plain
    denoising loss on the *real* image noised to the start step (it keeps the model a
    denoiser of real images). The published defaults are ``scale = 1e-3`` and
    ``mse_weight = 0.01``. The optional feature term (the paper's "v2" variant uses a CLIP
    similarity to the real image) pulls the generated image's features towards the real
    one; ``feature_similarity`` is any per-image similarity (higher = closer).
    """
    loss = -(rewards.float() + reward_offset).mean() * reward_scale
    if denoising_mse is not None:
        loss = loss + mse_weight * denoising_mse.float().mean()
    loss = scale * loss
    if feature_similarity is not None and feature_weight:
        loss = loss - feature_weight * feature_similarity.float().mean()
    return loss


# ----------------------------------------------------------------------------- denoising loss
def denoising_target(
    prediction_type: str, x0: Tensor, noise: Tensor, alpha_prod_t: Tensor | float | None = None
) -> Tensor:
    """What the denoiser should output for ``x_t`` built from ``x0`` and ``noise``.

    * ``"epsilon"``: ``eps`` (Ho et al. 2020, eq. 14);
    * ``"v_prediction"``: ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (Salimans & Ho 2022, §4);
    * ``"flow"``: the velocity ``eps - x0`` of ``x_t = (1 - sigma) x0 + sigma eps``
      (rectified flow; Esser et al. 2024, eq. 1-3).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return noise - x0
    if prediction_type == "v_prediction":
        if alpha_prod_t is None:
            raise ValueError("v_prediction targets need alpha_prod_t")
        a = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=x0.device)
        if a.ndim:
            a = a.view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or flow")


def denoising_loss(model_output: Tensor, target: Tensor) -> Tensor:
    """The pre-training objective ``E ||f_theta(x_t, t, c) - target||^2`` (mean over elements).

    ReFL regularises with it on a caption/image dataset (Xu et al. 2023, §4, ``L_pre``);
    ImageReFL adds it on its real images.
    """
    return torch.nn.functional.mse_loss(model_output.float(), target.float())
