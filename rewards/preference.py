"""Pairwise preference likelihoods and losses: pure functions of score tensors.

Every function takes scores (``Tensor[B]``, or ``[B, K]`` for aspects) and a *target*: the
probability that item A is preferred, ``1`` (A better), ``0`` (B better) or ``0.5`` (tie; the
soft label PickScore trains with). :func:`label_to_target` turns the usual spellings
("A", "B", "tie", "A>B", ...) into that number. Losses are means over the batch unless
``reduction="none"``.

Sources (facts, not code, taken from):

* Bradley & Terry (1952), "Rank analysis of incomplete block designs": ``P(A>B) = sigma(s_A - s_B)``.
* Rao & Kupper (1967), "Ties in paired-comparison experiments: a generalization of the
  Bradley-Terry model"; Davidson (1970), "On extending the Bradley-Terry model to accommodate ties".
* Touvron et al. (2023), Llama 2, eq. 2: a margin inside the sigmoid; EditReward
  (``TIGER-AI-Lab/EditReward``) uses a constant margin of 0.57.
* EditReward's uncertainty-aware loss: each item scores ``(mu, log_sigma)``,
  ``z ~ N(mu_A - mu_B, sigma_A^2 + sigma_B^2)``, loss ``E[-log sigma(z)]`` estimated with 1000
  Monte-Carlo samples. :func:`uncertainty_loss` also offers Gauss-Hermite quadrature, a
  deterministic estimate of the same expectation.
* VisualQuality-R1 (Wu et al. 2025): Thurstone comparative probability
  ``Phi((s_i - mu_j) / sqrt(var_i + var_j + 1e-6))`` and the fidelity reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EDITREWARD_MARGIN",
    "THURSTONE_EPS",
    "bradley_terry_loss",
    "bradley_terry_probability",
    "davidson_loss",
    "davidson_probabilities",
    "fidelity_reward",
    "label_to_target",
    "margin_loss",
    "multi_aspect_loss",
    "preference_loss",
    "rao_kupper_loss",
    "rao_kupper_probabilities",
    "thurstone_loss",
    "thurstone_probability",
    "uncertainty_loss",
    "uncertainty_loss_gauss_hermite",
    "uncertainty_loss_monte_carlo",
]

#: The constant margin of EditReward's "margin" loss option.
EDITREWARD_MARGIN = 0.57
#: VisualQuality-R1 adds this to the variance sum so equal, certain scores stay defined.
THURSTONE_EPS = 1e-6

_A_WINS = {"a", "a>b", "b<a", "left", "first", "0>1", "1"}
_B_WINS = {"b", "b>a", "a<b", "right", "second", "1>0", "-1"}
_TIES = {"tie", "=", "a=b", "a=b=good", "a=b=bad", "draw", "0.5", "equal"}


def label_to_target(label) -> float:
    """The probability that A is preferred, from a label.

    Strings: ``"A"``/``"A>B"``/``"left"`` -> 1, ``"B"``/``"B>A"``/``"A<B"`` -> 0,
    ``"tie"``/``"A=B"`` (EditReward's ``"A=B=Good"``/``"A=B=Bad"``) -> 0.5. Numbers are a
    probability in ``[0, 1]`` (``-1`` also means B, as in EditReward's ``h`` labels).
    Raises ``ValueError`` naming the label otherwise.
    """
    if isinstance(label, bool):
        return 1.0 if label else 0.0
    if isinstance(label, (int, float)):
        value = float(label)
        if value == -1.0:
            return 0.0
        if 0.0 <= value <= 1.0:
            return value
        raise ValueError(f"numeric preference label must be in [0, 1] (or -1 for B), got {label!r}")
    if isinstance(label, str):
        key = label.strip().lower().replace(" ", "")
        if key in _A_WINS:
            return 1.0
        if key in _B_WINS:
            return 0.0
        if key in _TIES:
            return 0.5
    raise ValueError(f"unknown preference label {label!r}: use 'A', 'B', 'tie' or a probability that A wins")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _target(target, like: Tensor) -> Tensor:
    return torch.as_tensor(target, dtype=like.dtype, device=like.device).expand_as(like)


# -- Bradley-Terry -----------------------------------------------------------------------
def bradley_terry_probability(score_a: Tensor, score_b: Tensor) -> Tensor:
    """``P(A > B) = sigma(s_A - s_B)`` (Bradley & Terry 1952, with ``pi = exp(s)``)."""
    return torch.sigmoid(score_a - score_b)


def bradley_terry_loss(score_a: Tensor, score_b: Tensor, target, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the Bradley-Terry probability against the target.

    ``-[p log sigma(d) + (1-p) log sigma(-d)]`` with ``d = s_A - s_B``. With ``p = 0.5`` (a tie)
    it is minimised at ``d = 0``: PickScore's soft-label treatment of ties.
    """
    d = score_a - score_b
    p = _target(target, d)
    loss = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    return _reduce(loss, reduction)


def margin_loss(score_a: Tensor, score_b: Tensor, target, margin: float = EDITREWARD_MARGIN,
                reduction: str = "mean") -> Tensor:
    """Bradley-Terry with a constant margin: ``-log sigma(s_win - s_lose - m)`` (Llama 2 eq. 2).

    The winner must beat the loser by ``margin`` before the loss flattens; EditReward's
    option uses ``m = 0.57``. Soft targets mix both directions; a tie (0.5) applies the
    margin to neither side, i.e. the plain Bradley-Terry tie loss.
    """
    d = score_a - score_b
    p = _target(target, d)
    tie = (p == 0.5).to(d.dtype)
    m = margin * (1 - tie)
    loss = -(p * F.logsigmoid(d - m) + (1 - p) * F.logsigmoid(-d - m))
    return _reduce(loss, reduction)


# -- Bradley-Terry with ties --------------------------------------------------------------
def rao_kupper_probabilities(score_a: Tensor, score_b: Tensor, theta: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(P(A>B), P(B>A), P(tie))`` of Rao & Kupper (1967), ``theta >= 1``.

    ``P(A>B) = pi_A / (pi_A + theta pi_B) = sigma(d - log theta)`` with ``pi = exp(s)``;
    ``P(tie) = 1 - P(A>B) - P(B>A)``. At ``theta = 1`` ties have probability 0 and it is
    Bradley-Terry.
    """
    log_theta = torch.log(torch.as_tensor(theta, dtype=score_a.dtype, device=score_a.device))
    if bool((log_theta < 0).any()):
        raise ValueError(f"Rao-Kupper theta must be >= 1, got {theta}")
    d = score_a - score_b
    p_a = torch.sigmoid(d - log_theta)
    p_b = torch.sigmoid(-d - log_theta)
    return p_a, p_b, (1 - p_a - p_b).clamp_min(0)


def _tie_nll(log_p_a: Tensor, log_p_b: Tensor, log_p_tie: Tensor, target: Tensor) -> Tensor:
    """NLL of the observed outcome: 1 -> A won, 0 -> B won, 0.5 -> tie (soft values mix A/B)."""
    decisive = -(target * log_p_a + (1 - target) * log_p_b)
    return torch.where(target == 0.5, -log_p_tie, decisive)  # where, not a product: log P(tie) may be -inf


def rao_kupper_loss(score_a: Tensor, score_b: Tensor, target, theta: float | Tensor = 2.0,
                    reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of wins and ties under Rao-Kupper; see :func:`rao_kupper_probabilities`."""
    log_theta = torch.log(torch.as_tensor(theta, dtype=score_a.dtype, device=score_a.device))
    d = score_a - score_b
    log_p_a = F.logsigmoid(d - log_theta)
    log_p_b = F.logsigmoid(-d - log_theta)
    # P(tie) = (theta^2 - 1) pi_A pi_B / ((pi_A + theta pi_B)(pi_B + theta pi_A)) = (theta^2 - 1) P(A>B) P(B>A)
    log_p_tie = torch.log(torch.expm1(2 * log_theta).clamp_min(1e-30)) + log_p_a + log_p_b
    return _reduce(_tie_nll(log_p_a, log_p_b, log_p_tie, _target(target, d)), reduction)


def davidson_probabilities(score_a: Tensor, score_b: Tensor, nu: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(P(A>B), P(B>A), P(tie))`` of Davidson (1970), ``nu >= 0``.

    ``P(A>B) = pi_A / (pi_A + pi_B + nu sqrt(pi_A pi_B))``, ``P(tie) = nu sqrt(pi_A pi_B) / (...)``;
    dividing by ``sqrt(pi_A pi_B)``: ``e^{d/2} / (e^{d/2} + e^{-d/2} + nu)``. ``nu = 0`` is Bradley-Terry.
    """
    log_p_a, log_p_b, log_p_tie = _davidson_log_probs(score_a - score_b, nu)
    return log_p_a.exp(), log_p_b.exp(), log_p_tie.exp()


def _davidson_log_probs(d: Tensor, nu) -> tuple[Tensor, Tensor, Tensor]:
    nu = torch.as_tensor(nu, dtype=d.dtype, device=d.device)
    if bool((nu < 0).any()):
        raise ValueError(f"Davidson nu must be >= 0, got {nu}")
    log_nu = torch.log(nu).expand_as(d)  # -inf at nu = 0: logsumexp handles it
    half = d / 2
    log_den = torch.logsumexp(torch.stack([half, -half, log_nu]), dim=0)
    return half - log_den, -half - log_den, log_nu - log_den


def davidson_loss(score_a: Tensor, score_b: Tensor, target, nu: float | Tensor = 1.0, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of wins and ties under Davidson's model."""
    d = score_a - score_b
    log_p_a, log_p_b, log_p_tie = _davidson_log_probs(d, nu)
    return _reduce(_tie_nll(log_p_a, log_p_b, log_p_tie, _target(target, d)), reduction)


# -- EditReward: uncertainty-aware ---------------------------------------------------------
def _uncertainty_moments(mu_a, log_sigma_a, mu_b, log_sigma_b) -> tuple[Tensor, Tensor]:
    mean = mu_a - mu_b
    std = torch.sqrt(torch.exp(2 * log_sigma_a) + torch.exp(2 * log_sigma_b))
    return mean, std


def _expected_pair_nll(z: Tensor, p: Tensor, weights: Tensor | None) -> Tensor:
    """``E[-(p log sigma(z) + (1-p) log sigma(-z))]`` over the last dim of ``z``."""
    nll = -(p.unsqueeze(-1) * F.logsigmoid(z) + (1 - p.unsqueeze(-1)) * F.logsigmoid(-z))
    return nll.mean(-1) if weights is None else (nll * weights).sum(-1)


def uncertainty_loss_monte_carlo(mu_a: Tensor, log_sigma_a: Tensor, mu_b: Tensor, log_sigma_b: Tensor, target=1.0,
                                 num_samples: int = 1000, generator: torch.Generator | None = None,
                                 reduction: str = "mean") -> Tensor:
    """EditReward's estimate: ``num_samples`` reparameterised draws ``z = m + s eps`` (1000 in the reference).

    Gradients flow to ``mu`` and ``log_sigma`` through the reparameterisation.
    """
    mean, std = _uncertainty_moments(mu_a, log_sigma_a, mu_b, log_sigma_b)
    eps = torch.randn(*mean.shape, num_samples, generator=generator, dtype=mean.dtype,
                      device=mean.device if generator is None else generator.device)
    z = mean.unsqueeze(-1) + std.unsqueeze(-1) * eps.to(mean.device)
    return _reduce(_expected_pair_nll(z, _target(target, mean), None), reduction)


@lru_cache(maxsize=8)
def _hermite_nodes(num_points: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(num_points)
    return tuple(float(v) for v in x), tuple(float(v) for v in w)


def uncertainty_loss_gauss_hermite(mu_a: Tensor, log_sigma_a: Tensor, mu_b: Tensor, log_sigma_b: Tensor,
                                   target=1.0, num_points: int = 32, reduction: str = "mean") -> Tensor:
    """The same expectation by Gauss-Hermite quadrature: deterministic and smooth.

    ``E[f(z)], z ~ N(m, s^2) = (1/sqrt(pi)) sum_i w_i f(m + sqrt(2) s x_i)`` (Abramowitz &
    Stegun 25.4.46). ``-log sigma`` is smooth and grows linearly, so 32 nodes are accurate to
    far below the MC error of 1000 samples (see ``tests/test_rewards_preference.py``).
    """
    mean, std = _uncertainty_moments(mu_a, log_sigma_a, mu_b, log_sigma_b)
    nodes, weights = _hermite_nodes(num_points)
    x = torch.tensor(nodes, dtype=mean.dtype, device=mean.device)
    w = torch.tensor(weights, dtype=mean.dtype, device=mean.device) / math.sqrt(math.pi)
    z = mean.unsqueeze(-1) + math.sqrt(2.0) * std.unsqueeze(-1) * x
    return _reduce(_expected_pair_nll(z, _target(target, mean), w), reduction)


def uncertainty_loss(mu_a: Tensor, log_sigma_a: Tensor, mu_b: Tensor, log_sigma_b: Tensor, target=1.0,
                     estimator: str = "gauss-hermite", num_samples: int = 1000, num_points: int = 32,
                     generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """EditReward's uncertainty-aware loss ``E[-log sigma(z)]``, ``z ~ N(mu_A - mu_B, sigma_A^2 + sigma_B^2)``.

    ``estimator="monte-carlo"`` is the reference (``num_samples`` draws); ``"gauss-hermite"``
    is deterministic. A target ``p`` other than 1 mixes ``-log sigma(z)`` and ``-log sigma(-z)``.
    """
    if estimator in ("monte-carlo", "mc"):
        return uncertainty_loss_monte_carlo(mu_a, log_sigma_a, mu_b, log_sigma_b, target, num_samples,
                                            generator, reduction)
    if estimator in ("gauss-hermite", "gh"):
        return uncertainty_loss_gauss_hermite(mu_a, log_sigma_a, mu_b, log_sigma_b, target, num_points, reduction)
    raise ValueError(f"estimator must be 'monte-carlo' or 'gauss-hermite', got {estimator!r}")


# -- VisualQuality-R1: Thurstone -----------------------------------------------------------
def thurstone_probability(score_i: Tensor, var_i: Tensor, mean_j: Tensor, var_j: Tensor,
                          eps: float = THURSTONE_EPS) -> Tensor:
    """``Phi((s_i - mu_j) / sqrt(var_i + var_j + eps))``: Thurstone's case V with per-item variances.

    VisualQuality-R1 compares a rollout's score ``s_i`` with the mean ``mu_j`` of another
    image's rollouts; with one score per item pass the two scores and their variances.
    """
    z = (score_i - mean_j) / torch.sqrt(var_i + var_j + eps)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


def thurstone_loss(mu_a: Tensor, var_a: Tensor, mu_b: Tensor, var_b: Tensor, target, eps: float = THURSTONE_EPS,
                   reduction: str = "mean") -> Tensor:
    """Cross-entropy of the Thurstone probability against the target (``log Phi`` via ``special.log_ndtr``)."""
    z = (mu_a - mu_b) / torch.sqrt(var_a + var_b + eps)
    p = _target(target, z)
    loss = -(p * torch.special.log_ndtr(z) + (1 - p) * torch.special.log_ndtr(-z))
    return _reduce(loss, reduction)


def fidelity_reward(probability: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """VisualQuality-R1's fidelity ``sqrt(p g + eps) + sqrt((1-p)(1-g) + eps)``: 1 when ``p = g`` in {0, 1}."""
    g = _target(target, probability)
    return torch.sqrt(probability * g + eps) + torch.sqrt((1 - probability) * (1 - g) + eps)


# -- one entry point, and aspects -----------------------------------------------------------
LOSSES = ("bt", "margin", "rao-kupper", "davidson", "uncertainty", "thurstone")


def preference_loss(kind: str, out_a: Tensor, out_b: Tensor, target, reduction: str = "mean", *,
                    margin: float = EDITREWARD_MARGIN, theta: float = 2.0, nu: float = 1.0,
                    estimator: str = "gauss-hermite", num_samples: int = 1000, num_points: int = 32,
                    generator: torch.Generator | None = None) -> Tensor:
    """Dispatch by name. ``out_*`` are scores ``[...]``, or ``[..., 2] = (mu, log_sigma)`` for
    ``"uncertainty"`` and ``"thurstone"`` (variance ``exp(2 log_sigma)``)."""
    if kind in ("uncertainty", "thurstone"):
        if out_a.shape[-1] != 2:
            raise ValueError(f"loss {kind!r} needs (mu, log_sigma) outputs [..., 2], got shape {tuple(out_a.shape)}")
        mu_a, ls_a, mu_b, ls_b = out_a[..., 0], out_a[..., 1], out_b[..., 0], out_b[..., 1]
        if kind == "uncertainty":
            return uncertainty_loss(mu_a, ls_a, mu_b, ls_b, target, estimator, num_samples, num_points,
                                    generator, reduction)
        return thurstone_loss(mu_a, torch.exp(2 * ls_a), mu_b, torch.exp(2 * ls_b), target, reduction=reduction)
    if kind == "bt":
        return bradley_terry_loss(out_a, out_b, target, reduction)
    if kind == "margin":
        return margin_loss(out_a, out_b, target, margin, reduction)
    if kind == "rao-kupper":
        return rao_kupper_loss(out_a, out_b, target, theta, reduction)
    if kind == "davidson":
        return davidson_loss(out_a, out_b, target, nu, reduction)
    raise ValueError(f"unknown preference loss {kind!r}; known: {', '.join(LOSSES)}")


def multi_aspect_loss(kind: str, out_a: Tensor, out_b: Tensor, aspect_targets: Tensor,
                      overall_target: Tensor | None = None, aspect_weights: Sequence[float] | None = None,
                      overall_weight: float = 1.0, **options) -> dict[str, Tensor]:
    """Per-aspect preference losses plus one on the aggregate score (the mean over aspects).

    ``out_*``: ``[B, K]`` (or ``[B, K, 2]`` for uncertainty outputs); ``aspect_targets``:
    ``[B, K]`` with ``NaN`` where an aspect is not labelled (it then adds nothing).
    The aggregate is what the reward returns (EditReward averages its heads' ``mu``); its
    loss uses ``overall_target`` when given. Returns ``{"aspect_<k>": ..., "overall": ...,
    "loss": total}``; per-aspect values are means over labelled pairs (0 when none).
    """
    k = out_a.shape[1]
    weights = torch.as_tensor(aspect_weights if aspect_weights is not None else [1.0] * k,
                              dtype=out_a.dtype, device=out_a.device)
    if weights.numel() != k:
        raise ValueError(f"{weights.numel()} aspect weights for {k} aspects")
    labelled = ~torch.isnan(aspect_targets)
    per_pair = preference_loss(kind, out_a, out_b, torch.nan_to_num(aspect_targets, nan=0.5), "none", **options)
    out: dict[str, Tensor] = {}
    total = out_a.new_zeros(())
    for aspect in range(k):
        mask = labelled[:, aspect]
        value = per_pair[:, aspect][mask].mean() if bool(mask.any()) else out_a.new_zeros(())
        out[f"aspect_{aspect}"] = value
        total = total + weights[aspect] * value
    if overall_target is not None:
        out["overall"] = preference_loss(kind, out_a.mean(1), out_b.mean(1), overall_target, **options)
        total = total + overall_weight * out["overall"]
    out["loss"] = total
    return out
