"""Preference-optimisation objectives: Diffusion-DPO (with H-DPO, IPO and hinge variants),
Diffusion-KTO, the Diffusion-SDPO winner-preserving scale, and reward-weighted denoising.

Everything here is a pure function of per-sample denoising errors (``[B]`` tensors made by
:func:`per_sample_error`), so each objective can be checked against its paper by hand. The
trainers decide which images, timesteps and noises those errors come from; the winner and
the loser of a pair must share the timestep and the noise.

A diffusion model has no tractable likelihood; Diffusion-DPO replaces ``log p(x)`` by the
negative denoising error (an ELBO surrogate). Reading guide for the symbols below:
``m_w, m_l`` are the policy's errors on the winner and the loser, ``r_w, r_l`` the reference
model's, all at the same ``(t, noise)``. A lower error means a higher likelihood.

Sources (equations are written out in each docstring):

* Diffusion-DPO — Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference
  Optimization" (CVPR 2024), eq. 14; released script ``SalesforceAIResearch/DiffusionDPO``
  (``train.py``), re-implemented in diffusers' ``examples/research_projects/diffusion_dpo``.
* H-DPO — Omura, Fujita, Kataoka 2024, "Entropy Controllable Direct Preference
  Optimization", arXiv:2411.07595 (an LLM method; transcribed to diffusion here).
* IPO — Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036, eq. 17.
* Hinge (SLiC) — Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback", arXiv:2305.10425; the ``"hinge"`` loss of trl and of diffusers' DPO example.
* Diffusion-KTO — Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility"
  (NeurIPS 2024); released script ``jacklishufan/diffusion-kto``. KTO itself: Ethayarajh et
  al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306.
* Diffusion-SDPO — "Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion
  Models", arXiv:2511.03317; released code ``AIDC-AI/Diffusion-SDPO``.
* Reward-weighted likelihood — Lee et al. 2023, "Aligning Text-to-Image Models using Human
  Feedback", arXiv:2302.12192, §3.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "PreferenceLossOutput",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "per_sample_error",
    "reward_weighted_loss",
    "winner_preserving_scale",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def per_sample_error(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all non-batch dims, in float32: ``[B, ...] -> [B]``.

    This is the per-sample denoising loss ``||f_theta(x_t, t, c) - target||^2`` (averaged
    over elements, as every released DPO/KTO script does) that the preference losses take as
    their surrogate for ``-log p(x)``. Computed in float32 so that bf16/fp16 predictions do
    not round away the small winner/loser differences the losses are built on.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.ndim == 0:
        raise ValueError("per_sample_error needs a batch dimension, got a 0-d tensor")
    sq = (pred.float() - target.float()).pow(2)
    if sq.ndim == 1:
        return sq
    return sq.mean(dim=tuple(range(1, sq.ndim)))


@dataclass
class PreferenceLossOutput:
    """What a preference loss returns.

    * ``loss``: scalar to backpropagate (mean over the kept pairs / samples).
    * ``implicit_accuracy``: scalar, detached; the fraction of kept items whose logit
      ``inside`` is strictly positive (ties at exactly 0 count as wrong).
    * ``reward_margin``: scalar, detached; the mean of ``inside`` over the kept items. For
      DPO/H-DPO this is the implicit reward of the winner minus that of the loser,
      ``R(x) = 0.5 * beta * (r(x) - alpha * m(x))`` (reference error minus policy error,
      scaled), i.e. ``mean(-0.5 * beta * (alpha * (m_w - m_l) - (r_w - r_l)))``. For KTO it is
      the signed implicit reward relative to the KL baseline, ``mean(sign * beta * (g - kl))``.
    * ``inside``: ``[B]`` the per-item logit, *attached* to the graph (callers detach it for
      logging). Masked items are included, so its shape always matches the inputs.
    """

    loss: Tensor
    implicit_accuracy: Tensor
    reward_margin: Tensor
    inside: Tensor


def _check_errors(**errors: Tensor) -> torch.Size:
    shapes = {name: tuple(e.shape) for name, e in errors.items()}
    first = next(iter(errors.values())).shape
    if len(first) != 1 or any(e.shape != first for e in errors.values()):
        raise ValueError(f"expected per-sample errors of one shape [B] (see per_sample_error), got {shapes}")
    return first


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``values`` over ``keep``; 0 (still in the graph) when nothing is kept.

    Written without boolean indexing so it never synchronises with the device.
    """
    w = keep.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def diffusion_dpo_loss(
    model_w: Tensor,
    model_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    *,
    beta: float,
    alpha: float = 1.0,
    loss_type: str = "sigmoid",
    mask: Tensor | None = None,
) -> PreferenceLossOutput:
    """Diffusion-DPO and H-DPO on per-sample denoising errors (all ``[B]``).

    **Diffusion-DPO** (Wallace et al. 2024, eq. 14, with ``T * omega(lambda_t)`` folded into
    ``beta`` as the released ``train.py`` does)::

        inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
        loss   = -log sigmoid(inside)                               # loss_type="sigmoid"

    ``inside > 0`` when the policy lowered the winner's error relative to the loser's more
    than the reference did. The released launch scripts use ``beta = 5000`` (``--beta_dpo``).
    diffusers' DPO example writes ``beta_dpo * (ref_diff - model_diff)`` without the 0.5, so
    its ``beta_dpo`` is our ``beta / 2``.

    **H-DPO** (Omura et al. 2024). The LLM objective splits DPO's reverse KL into
    ``-H(pi) + CE(pi, pi_ref)`` and weights the entropy by ``alpha``; the optimal policy is
    ``pi* ∝ pi_ref^(1/alpha) exp(r / (alpha * beta))`` and the logit becomes
    ``beta * [(alpha log pi(y_w) - log pi_ref(y_w)) - (alpha log pi(y_l) - log pi_ref(y_l))]``:
    the *policy* log-likelihoods are multiplied by ``alpha``, the reference ones are not.
    Transcribed to diffusion (``log p -> -error``)::

        inside = -0.5 * beta * (alpha * (m_w - m_l) - (r_w - r_l))

    ``alpha = 1`` is Diffusion-DPO. The paper shows that ``alpha < 1`` lowers the entropy of
    the optimal policy (a sharper, more mode-seeking distribution: the direction the paper
    advocates) and ``alpha > 1`` raises it; for images, ``alpha < 1`` is therefore
    expected to sharpen the policy (less diversity). This is our transcription, not a result
    of the paper, which studies LLMs only: the ELBO surrogate drops the terms that do not
    depend on the model, and with ``alpha != 1`` those add ``(alpha - 1) * (C_w - C_l)`` to
    the logit, a constant in the parameters that we also drop.

    **Variants** (``loss_type``), written on the log-ratio ``h = inside / beta`` so that the
    three share one ``beta``:

    * ``"sigmoid"``: ``-log sigmoid(beta * h)`` (DPO);
    * ``"ipo"``: ``(h - 1 / (2 * beta))^2`` (Azar et al. 2023, eq. 17, with their ``tau`` as
      ``beta``), which regresses the log-ratio to a finite target instead of pushing it to
      infinity. diffusers' example computes ``(ref_diff - model_diff - 1/(2*beta_d))^2``
      (no 0.5 in the log-ratio); with ``beta = 2 * beta_d`` ours is exactly 1/4 of it;
    * ``"hinge"``: ``relu(1 - beta * h)`` (SLiC-HF), identical to diffusers' with
      ``beta = 2 * beta_d``.

    ``mask`` (``[B]`` bool) keeps the pairs that count (e.g. ties dropped); the loss and the
    metrics are means over kept pairs, and with none kept the loss is an exact 0 that still
    backpropagates (zero gradients). Masked pairs must still hold finite numbers.

    The reference errors are detached: the reference model is fixed. Returns a
    :class:`PreferenceLossOutput` whose ``inside`` is the ``[B]`` logit above.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (1 is Diffusion-DPO, < 1 sharpens, > 1 flattens), got {alpha}")
    _check_errors(model_w=model_w, model_l=model_l, ref_w=ref_w, ref_l=ref_l)

    model_diff = model_w.float() - model_l.float()
    ref_diff = ref_w.detach().float() - ref_l.detach().float()
    inside = -0.5 * beta * (alpha * model_diff - ref_diff)

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(inside)
    elif loss_type == "ipo":
        per_pair = (inside / beta - 1.0 / (2.0 * beta)).pow(2)
    else:  # hinge
        per_pair = torch.relu(1.0 - inside)

    if mask is None:
        keep = torch.ones_like(inside, dtype=torch.bool)
    else:
        if mask.dtype != torch.bool or mask.shape != inside.shape:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(inside.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = mask.to(inside.device)

    detached = inside.detach()
    return PreferenceLossOutput(
        loss=_masked_mean(per_pair, keep),
        implicit_accuracy=_masked_mean((detached > 0).float(), keep),
        reward_margin=_masked_mean(detached, keep),
        inside=inside,
    )


def winner_preserving_scale(
    grad_w: Tensor, grad_l: Tensor, *, mu: float = 0.0, max_scale: float = 1.0
) -> float:
    """Diffusion-SDPO's scale ``lambda`` for the loser branch (arXiv:2511.03317).

    ``grad_w`` and ``grad_l`` are the output-space gradients of the winner's and the loser's
    denoising losses with respect to the model's predictions on them (same shape; for a mean
    squared error they are proportional to ``pred - target``, and a common factor cancels).
    The DPO update moves along ``-(g_w - lambda * g_l)`` (times a positive weight); asking
    that it lowers the winner's loss at least by ``mu * ||g_w||^2`` to first order::

        (-g_w + lambda * g_l) . g_w <= -mu * ||g_w||^2
        =>  lambda <= (1 - mu) * ||g_w||^2 / (g_l . g_w)      when g_l . g_w > 0

    Returns ``min(max_scale, that bound)`` (clamped at >= 0), or ``max_scale`` when
    ``g_l . g_w <= 0`` (then the loser term already helps the winner). ``mu`` in ``[0, 1]``;
    larger is more conservative. The released code uses ``mu = 0`` by default and
    ``max_scale = 1``, and applies ``lambda`` to the loser's error in the backward pass only::

        m_l_scaled = m_l.detach() + lam * (m_l - m_l.detach())

    The inner product of two different samples' output gradients stands in for the
    parameter-space one (the paper's output-space approximation).
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    if not max_scale >= 0:
        raise ValueError(f"max_scale must be >= 0, got {max_scale}")
    if grad_w.shape != grad_l.shape:
        raise ValueError(
            f"grad_w and grad_l must have the same shape, got {tuple(grad_w.shape)} and {tuple(grad_l.shape)}"
        )
    gw = grad_w.detach().double().flatten()
    gl = grad_l.detach().double().flatten()
    num = float(gw.dot(gw))
    den = float(gl.dot(gw))
    if den <= 0.0:
        return float(max_scale)
    return float(min(max(0.0, (1.0 - mu) * num / den), max_scale))


def diffusion_kto_loss(
    model_err: Tensor,
    ref_err: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    kl: Tensor | None = None,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> PreferenceLossOutput:
    """Diffusion-KTO on per-sample denoising errors (all ``[B]``; Li et al. 2024).

    KTO (Ethayarajh et al. 2024, eq. 8) on the implicit reward ``g = log pi/pi_ref``, with
    the diffusion surrogate ``log p -> -error``::

        g      = ref_err - model_err                 # > 0: policy denoises better than ref
        z      = kl                                  # reference point, no gradient
        inside = sign * beta * (g - z)               # sign = +1 desirable, -1 undesirable
        loss   = mean( lambda_y * (1 - sigmoid(inside)) )

    ``lambda_y`` is ``lambda_d`` for desirable and ``lambda_u`` for undesirable samples (KTO
    recommends ``lambda_d * n_d / (lambda_u * n_u)`` in ``[1, 4/3]``). ``beta`` multiplies
    the errors directly, as in the released Diffusion-KTO script (no DPO-style 0.5).

    The reference point: KTO estimates ``KL(pi || pi_ref)`` on mismatched (prompt, output)
    pairs, clamps it at 0 and does not backpropagate through it. The released Diffusion-KTO
    script's default instead uses the batch itself: ``kl = max(0, mean(g))``, detached (and
    averaged over processes). That is what happens when ``kl`` is None. A given ``kl`` (e.g.
    the mismatched-pair estimate, or an all-reduced one under DDP) is detached and used as
    is; clamp it yourself if you want KTO's ``max(0, .)``.

    ``desirable`` is a ``[B]`` bool tensor (any other dtype is read as ``!= 0``).
    ``implicit_accuracy = mean(sign * (g - kl) > 0)``; ``reward_margin = mean(inside)``.
    The reference errors are detached.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_errors(model_err=model_err, ref_err=ref_err)
    if desirable.shape != model_err.shape:
        raise ValueError(f"desirable must have shape {tuple(model_err.shape)}, got {tuple(desirable.shape)}")
    good = desirable.to(model_err.device)
    if good.dtype != torch.bool:
        good = good != 0

    g = ref_err.detach().float() - model_err.float()
    if kl is None:
        z = g.detach().mean().clamp(min=0.0)
    else:
        z = torch.as_tensor(kl, device=g.device).detach().float()
    sign = torch.where(good, 1.0, -1.0).to(g)
    inside = sign * beta * (g - z)
    weight = torch.where(good, float(lambda_d), float(lambda_u)).to(g)
    loss = (weight * (1.0 - torch.sigmoid(inside))).mean()

    detached = inside.detach()
    return PreferenceLossOutput(
        loss=loss,
        implicit_accuracy=(detached > 0).float().mean(),
        reward_margin=detached.mean(),
        inside=inside,
    )


def reward_weighted_loss(errors: Tensor, weights: Tensor, *, normalize: bool = False) -> Tensor:
    """Reward-weighted denoising loss (Lee et al. 2023, §3.3).

    Their fine-tuning objective is the reward-weighted negative log-likelihood
    ``E[-r_phi(x, z) * log p_theta(x | z)]`` over model samples (plus ``beta`` times the
    plain pre-training loss on real data, which the caller adds with
    :func:`imgalign.losses.denoising_loss`); for a diffusion model ``-log p`` is replaced
    by the denoising error. Here::

        loss = mean(w * errors)                    # normalize=False
        loss = sum(w * errors) / sum(w)            # normalize=True (a weighted mean)

    with ``w = weights.detach()``: the rewards weight the samples, they are not optimised.
    With ``normalize=True`` the weights must have a non-zero sum.
    """
    if errors.shape != weights.shape:
        raise ValueError(
            f"errors and weights must have the same shape, got {tuple(errors.shape)} and {tuple(weights.shape)}"
        )
    w = weights.detach().float()
    weighted = w * errors.float()
    if normalize:
        return weighted.sum() / w.sum()
    return weighted.mean()
