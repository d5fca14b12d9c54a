"""DiffusionNFT: negative-aware fine-tuning on the forward (noising) process.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"
(arXiv:2509.16117, ICLR 2026). Transcribed from the paper's objective and from the authors'
training script, ``NVlabs/DiffusionNFT`` ``scripts/train_nft_sd3.py`` (the loss inside the
timestep loop) with its defaults in ``config/base.py`` and ``config/nft.py``.

The paper's objective, for clean samples ``x0 ~ pi_old(. | c)`` of the old (sampling) policy,
a time ``t`` and ``x_t = (1 - t) x0 + t eps`` with the flow-matching target ``v = eps - x0``::

    L(theta) = E[ r ||v+_theta(x_t, c, t) - v||^2 + (1 - r) ||v-_theta(x_t, c, t) - v||^2 ]
    v+_theta = (1 - beta) v_old + beta v_theta      (implicit positive policy)
    v-_theta = (1 + beta) v_old - beta v_theta      (implicit negative policy)

with ``r`` in ``[0, 1]`` the optimality probability of ``x0``. The positive branch pulls
``v_theta`` towards the velocity of the well-rewarded samples, the negative branch pushes it
away from that of the badly-rewarded ones, both anchored at the old policy; the paper shows
the optimum is an improved policy (``v_old`` plus a reward-guided direction scaled by
``2 / beta``). At ``v_theta = v_old`` the gradient is ``2 (2r - 1) (v_old - v)`` per element, an
advantage-weighted flow-matching gradient: the loss needs no likelihood and no sampling
trajectory, only clean samples and their rewards.

What the released code adds, carried over here:

* ``r = 1/2 + 1/2 clip(A / clip_max, -1, 1)`` with ``A`` the group-normalised advantage
  (:func:`optimality_probability`; the paper's ``Z_c`` is ``clip_max`` times the std);
* the loss is divided by ``beta`` and multiplied by ``clip_max`` (``adv_clip_max = 5``), so
  the gradient at ``v_theta = v_old`` is ``2 A (v_old - v)`` whatever ``beta`` is (for the
  plain velocity regression; the adaptive weighting below rescales it per sample);
* *adaptive weighting*: each branch is the x0-prediction error ``x0_hat - x0`` (with
  ``x0_hat = x_t - t v``, so ``x0_hat - x0 = t (v_target - v)``) squared and divided by its
  own stop-gradient per-sample mean absolute value (clamped at ``1e-5``):
  a self-normalised regression whose scale does not depend on ``t`` or the sample;
* a KL-like regulariser ``kl_weight * ||v_theta - v_ref||^2`` against the base model
  (``train.beta = 1e-4``), added by the trainer (:mod:`imgalign.train.nft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["ADVANTAGE_MODES", "NftLossOutput", "nft_loss", "optimality_probability"]

AdvantageMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
ADVANTAGE_MODES: tuple[str, ...] = ("all", "positive_only", "negative_only", "one_only", "binary")


def optimality_probability(advantages: Tensor, clip_max: float = 5.0, mode: AdvantageMode = "all") -> Tensor:
    """The optimality probability ``r = 1/2 + 1/2 clip(A / clip_max, -1, 1)`` of each sample.

    ``advantages``: group-normalised rewards ``(R - mean_prompt) / (std + 1e-4)``
    (:func:`imgalign.losses.policy_gradient.group_advantages`). ``mode`` is the released
    script's ``train.adv_mode`` ablation: ``all`` (the default) keeps both signs;
    ``positive_only`` / ``negative_only`` zero the other sign; ``one_only`` replaces the
    advantage by 1 where it is positive and 0 elsewhere; ``binary`` by its sign (the script
    applies these *before* dividing by ``clip_max``, so ``one_only`` gives ``r`` in
    ``{0.5, 0.6}`` at the default clip: transcribed as is).
    """
    if clip_max <= 0:
        raise ValueError(f"clip_max must be positive, got {clip_max}")
    a = advantages.float().clamp(-clip_max, clip_max)
    if mode == "positive_only":
        a = a.clamp(0, clip_max)
    elif mode == "negative_only":
        a = a.clamp(-clip_max, 0)
    elif mode == "one_only":
        a = (a > 0).to(a.dtype)
    elif mode == "binary":
        a = torch.sign(a)
    elif mode != "all":
        raise ValueError(f"unknown advantage mode {mode!r}; choose one of {', '.join(ADVANTAGE_MODES)}")
    return (a / clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


@dataclass
class NftLossOutput:
    """The NFT loss and its parts (all but ``loss`` detached)."""

    loss: Tensor  # scalar: scale * mean(r * L+ + (1 - r) * L-) / beta
    positive: Tensor  # [B] per-sample loss of the implicit positive policy
    negative: Tensor  # [B] per-sample loss of the implicit negative policy
    unweighted: Tensor  # scalar: mean(r * L+ + (1 - r) * L-) / beta (the script's "unweighted_policy_loss")
    old_deviation: Tensor  # scalar: mean((v_theta - v_old)^2), how far training has moved from the sampler


def _branch_error(v: Tensor, v_target: Tensor, t: Tensor, adaptive: bool) -> Tensor:
    """Per-sample regression error of one implicit policy: ``[B, ...] -> [B]``."""
    dims = tuple(range(1, v.ndim))
    if not adaptive:
        return (v - v_target).pow(2).mean(dims)
    # x0_hat - x0 = (x_t - t v) - x0 = t (v_target - v): the script regresses the x0-prediction
    x0_error = t * (v_target - v)
    with torch.no_grad():
        weight = x0_error.double().abs().mean(dims, keepdim=True).clamp(min=1e-5)
    return (x0_error.pow(2) / weight.to(x0_error.dtype)).mean(dims)


def nft_loss(v_theta: Tensor, v_old: Tensor, v_target: Tensor, t: Tensor | float, r: Tensor, *, beta: float,
             scale: float = 1.0, adaptive_weighting: bool = True) -> NftLossOutput:  # fmt: skip
    """DiffusionNFT's loss on one batch of noised samples (see the module docstring).

    * ``v_theta``: the trained velocity at ``x_t`` (with gradient), ``[B, ...]``;
    * ``v_old``: the old (sampling) policy's velocity at the same ``x_t`` (no gradient is taken);
    * ``v_target``: the flow-matching target ``eps - x0``;
    * ``t``: the noise level of ``x_t`` (``x_t = (1 - t) x0 + t eps``), a number or ``[B]``;
    * ``r``: ``[B]`` optimality probabilities in ``[0, 1]`` (:func:`optimality_probability`);
    * ``beta``: the mixing coefficient of the implicit policies (``config.beta``: 1.0, 0.1 for OCR
      and multi-reward runs);
    * ``scale``: the released script multiplies the loss by ``adv_clip_max`` (5);
    * ``adaptive_weighting``: the script's self-normalised x0 regression (True) or the paper's
      plain velocity regression ``||v+- - v||^2`` (False).
    """
    if v_theta.shape != v_old.shape or v_theta.shape != v_target.shape:
        raise ValueError(f"v_theta, v_old and v_target must have one shape, got {tuple(v_theta.shape)}, "
                         f"{tuple(v_old.shape)} and {tuple(v_target.shape)}")  # fmt: skip
    if v_theta.ndim < 2 or r.shape != v_theta.shape[:1]:
        raise ValueError(f"expected batched velocities [B, ...] and r of shape [B], got {tuple(v_theta.shape)} and "
                         f"{tuple(r.shape)}")  # fmt: skip
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    v_theta, v_old, v_target = v_theta.float(), v_old.detach().float(), v_target.float()
    t = torch.as_tensor(t, dtype=torch.float32, device=v_theta.device)
    t = t.view(-1, *([1] * (v_theta.ndim - 1))) if t.ndim else t
    r = r.to(v_theta.device, torch.float32)
    positive = _branch_error(beta * v_theta + (1 - beta) * v_old, v_target, t, adaptive_weighting)
    negative = _branch_error((1 + beta) * v_old - beta * v_theta, v_target, t, adaptive_weighting)
    per_sample = (r * positive + (1 - r) * negative) / beta
    return NftLossOutput(
        loss=scale * per_sample.mean(),
        positive=positive.detach(),
        negative=negative.detach(),
        unweighted=per_sample.mean().detach(),
        old_deviation=(v_theta.detach() - v_old).pow(2).mean(),
    )
