"""Preference losses and evaluation metrics against hand-computed values and known limits."""

import math

import numpy as np
import pytest
import torch

from rewards import evaluation as E
from rewards import preference as P


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_label_to_target():
    assert [P.label_to_target(x) for x in ("A", "b", "tie", "A>B", "A<B", "A=B=Good", 1, 0, 0.5, -1)] == [
        1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown preference label"):
        P.label_to_target("maybe")


def test_bradley_terry_hand_values():
    # -log sigma(1) = log(1 + e^-1)
    assert P.bradley_terry_loss(t(1.0), t(0.0), 1.0).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert P.bradley_terry_loss(t(1.0), t(0.0), 0.0).item() == pytest.approx(math.log1p(math.exp(1)), abs=1e-12)
    assert P.bradley_terry_probability(t(2.0), t(2.0)).item() == 0.5
    # a tie (soft label 0.5) is minimised at equal scores: zero gradient there
    s_a = t(0.3).requires_grad_()
    P.bradley_terry_loss(s_a, t(0.3), 0.5).backward()
    assert abs(s_a.grad.item()) < 1e-12


def test_margin_loss():
    assert P.margin_loss(t(0.57), t(0.0), 1.0).item() == pytest.approx(math.log(2), abs=1e-12)
    assert P.margin_loss(t(0.0), t(0.57), 0.0).item() == pytest.approx(math.log(2), abs=1e-12)
    assert P.margin_loss(t(0.4), t(0.1), 1.0, margin=0.0).item() == pytest.approx(
        P.bradley_terry_loss(t(0.4), t(0.1), 1.0).item())


def test_rao_kupper_and_davidson_hand_values_and_limits():
    # equal scores: theta = 2 -> P(A) = 1/(1+2), P(tie) = (4-1)/(3*3) = 1/3
    p_a, p_b, p_tie = P.rao_kupper_probabilities(t(0.0), t(0.0), 2.0)
    assert (p_a.item(), p_b.item(), p_tie.item()) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # Davidson nu = 1 at equal scores: 1/(1+1+1) each
    p_a, p_b, p_tie = P.davidson_probabilities(t(0.0), t(0.0), 1.0)
    assert (p_a.item(), p_b.item(), p_tie.item()) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    d_a, d_b = t(0.7, -1.2, 3.0), t(0.1, 0.4, -0.5)
    for target in (1.0, 0.0):
        bt = P.bradley_terry_loss(d_a, d_b, target, "none")
        # the tie parameter vanishes -> Bradley-Terry
        assert torch.allclose(P.rao_kupper_loss(d_a, d_b, target, theta=1.0, reduction="none"), bt)
        assert torch.allclose(P.davidson_loss(d_a, d_b, target, nu=0.0, reduction="none"), bt)
    for probs in (P.rao_kupper_probabilities(d_a, d_b, 1.7), P.davidson_probabilities(d_a, d_b, 0.8)):
        assert torch.allclose(sum(probs), torch.ones(3, dtype=torch.float64))
        # conditional on a decision, symmetric scores give 0.5
    pa, pb, _ = P.rao_kupper_probabilities(t(0.9), t(0.9), 3.0)
    assert (pa / (pa + pb)).item() == pytest.approx(0.5)
    # tie NLL = -log P(tie), computed in log space for Rao-Kupper
    _, _, p_tie = P.rao_kupper_probabilities(d_a, d_b, 1.7)
    assert torch.allclose(P.rao_kupper_loss(d_a, d_b, 0.5, theta=1.7, reduction="none"), -p_tie.log())
    _, _, p_tie = P.davidson_probabilities(d_a, d_b, 0.8)
    assert torch.allclose(P.davidson_loss(d_a, d_b, 0.5, nu=0.8, reduction="none"), -p_tie.log())


def test_uncertainty_gauss_hermite_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64) * 2, torch.randn(6, generator=g, dtype=torch.float64)
    ls_a, ls_b = torch.randn(6, generator=g, dtype=torch.float64) * 0.5, torch.randn(6, generator=g, dtype=torch.float64) * 0.5
    gh = P.uncertainty_loss_gauss_hermite(mu_a, ls_a, mu_b, ls_b, 1.0, num_points=32, reduction="none")
    n = 400_000
    mc = P.uncertainty_loss_monte_carlo(mu_a, ls_a, mu_b, ls_b, 1.0, num_samples=n, generator=g, reduction="none")
    # standard error of the MC mean, per pair, from a separate draw
    mean, std = mu_a - mu_b, torch.sqrt(torch.exp(2 * ls_a) + torch.exp(2 * ls_b))
    z = mean[:, None] + std[:, None] * torch.randn(6, 20_000, generator=g, dtype=torch.float64)
    stderr = torch.nn.functional.softplus(-z).std(-1) / math.sqrt(n)
    assert ((gh - mc).abs() <= 5 * stderr + 1e-9).all(), (gh, mc, stderr)
    # the reference's 1000 samples are much noisier than the quadrature's own error
    gh64 = P.uncertainty_loss_gauss_hermite(mu_a, ls_a, mu_b, ls_b, 1.0, num_points=64, reduction="none")
    assert (gh - gh64).abs().max() < 1e-6
    # sigma -> 0: the plain Bradley-Terry loss
    tiny = torch.full_like(mu_a, -20.0)
    assert torch.allclose(P.uncertainty_loss(mu_a, tiny, mu_b, tiny, 1.0, reduction="none"),
                          P.bradley_terry_loss(mu_a, mu_b, 1.0, "none"), atol=1e-9)


def test_uncertainty_gradients_flow_to_mu_and_log_sigma():
    mu = torch.tensor([0.5, -0.2], requires_grad=True)
    log_sigma = torch.tensor([0.1, 0.3], requires_grad=True)
    for estimator in ("gauss-hermite", "monte-carlo"):
        mu.grad = log_sigma.grad = None
        P.uncertainty_loss(mu[:1], log_sigma[:1], mu[1:], log_sigma[1:], 1.0, estimator=estimator,
                           generator=torch.Generator().manual_seed(0)).backward()
        assert mu.grad[0] < 0 < mu.grad[1]  # push A up, B down
        assert log_sigma.grad.abs().sum() > 0


def test_thurstone_and_fidelity():
    assert P.thurstone_probability(t(1.0), t(0.5), t(1.0), t(0.5)).item() == pytest.approx(0.5)
    # (1 - 0) / sqrt(1 + 0 + 1e-6) ~ 1 -> Phi(1) = 0.841344746
    assert P.thurstone_probability(t(1.0), t(1.0), t(0.0), t(0.0)).item() == pytest.approx(0.8413447, abs=1e-6)
    loss = P.thurstone_loss(t(1.0), t(1.0), t(0.0), t(0.0), 1.0)
    assert loss.item() == pytest.approx(-math.log(0.8413447), abs=1e-5)
    assert P.fidelity_reward(t(1.0), t(1.0)).item() == pytest.approx(1.0, abs=1e-3)
    assert P.fidelity_reward(t(0.5), t(0.5)).item() == pytest.approx(1.0, abs=1e-6)


def test_multi_aspect_loss_masks_missing_aspects():
    out_a, out_b = t(1.0, 0.0, 2.0, 0.0).reshape(2, 2), t(0.0, 1.0, 0.0, 0.0).reshape(2, 2)
    targets = t(1.0, float("nan"), 0.0, 1.0).reshape(2, 2)
    res = P.multi_aspect_loss("bt", out_a, out_b, targets, overall_target=t(1.0, 1.0))
    assert res["aspect_0"].item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2)
    assert res["aspect_1"].item() == pytest.approx(math.log(2))  # only the second pair, d = 0
    overall = P.bradley_terry_loss(t(0.5, 1.0), t(0.5, 0.0), 1.0)
    assert res["overall"].item() == pytest.approx(overall.item())
    assert res["loss"].item() == pytest.approx(res["aspect_0"].item() + res["aspect_1"].item() + overall.item())


# -- evaluation ----------------------------------------------------------------------------
H = [1, -1, 0, 1, 0]
M = [0.5, 0.2, 0.1, -0.3, 0.6]


def test_accuracy_with_ties_hand_checked():
    # eps=0: only pair 0 right (1/5); eps=0.1: pair 2 becomes a right tie (2/5); larger eps
    # turn right pairs into wrong ties or add pair 4 back (2/5 at 0.6): best 0.4 at the smallest eps.
    acc, eps = E.accuracy_with_ties(H, M)
    assert (acc, eps) == (pytest.approx(0.4), pytest.approx(0.1))
    assert E.pairwise_accuracy(H, M) == pytest.approx(1 / 3)
    counts = E.tie_counts(H, M, 0.1)
    assert (counts.concordant, counts.discordant, counts.human_tie, counts.model_tie, counts.both_tie) == (1, 2, 1, 0, 1)


def test_accuracy_with_ties_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.choice([-1, 0, 1], size=200)
    m = np.round(rng.normal(size=200) + 0.4 * h, 1)  # rounded: many equal |m|
    acc, eps = E.accuracy_with_ties(h, m)
    best = max((E.tie_counts(h, m, e).accuracy, -e) for e in [0.0, *np.unique(np.abs(m))])
    assert acc == pytest.approx(best[0]) and eps == pytest.approx(-best[1])


def test_group_accuracy_and_rankings():
    assert E.parse_ranking("C>A>B", 3) == (2, 0, 1)
    assert E.parse_ranking("A=B=Good", 2) == "tie"
    assert E.parse_ranking([1, 0], 2) == (1, 0)
    groups = [([3.0, 1.0, 2.0], (0, 2, 1)), ([1.0, 2.0, 3.0], E.parse_ranking("C>A>B", 3)), ([0.5, 0.55], "tie"),
              ([0.2, 0.1, 0.4, 0.3], (2, 3, 0, 1))]
    assert E.group_accuracy(groups, epsilon=0.1) == pytest.approx(3 / 4)
    assert E.group_accuracy(groups, epsilon=0.0) == pytest.approx(2 / 4)


def test_rank_correlations():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    from scipy import stats

    assert E.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert E.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert E.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_reliability_and_plot(tmp_path):
    curve = E.reliability([0.05, 0.1, 0.9, 0.95, 0.55], [0, 0, 1, 1, 0.5], num_bins=10)
    assert curve["counts"][0] == 1 and curve["counts"][9] == 2
    assert curve["ece"] == pytest.approx((0.05 + 0.1 + 0.1 + 0.05 + 0.05) / 5)
    E.plot_reliability(curve, tmp_path / "rel.png")
    assert (tmp_path / "rel.png").stat().st_size > 1000
