"""Preference objectives checked against their papers' formulas, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from imgalign.losses import preference as P


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def _close(got: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-5, atol=1e-6)


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# Fixed pairs, beta = 10. Per pair: model_diff = m_w - m_l, ref_diff = r_w - r_l,
#   pair 0: (-0.10) - ( 0.00) = -0.10 -> inside = -5 * -0.10 =  0.50
#   pair 1: ( 0.05) - (-0.10) =  0.15 -> inside = -5 *  0.15 = -0.75
#   pair 2: ( 0.00) - (-0.20) =  0.20 -> inside = -5 *  0.20 = -1.00
M_W, M_L = (0.10, 0.30, 0.20), (0.20, 0.25, 0.20)
R_W, R_L = (0.15, 0.20, 0.10), (0.15, 0.30, 0.30)
BETA = 10.0
INSIDE = (0.5, -0.75, -1.0)


def _dpo(**kw) -> P.PreferenceLossOutput:
    return P.diffusion_dpo_loss(_t(*M_W), _t(*M_L), _t(*R_W), _t(*R_L), beta=BETA, **kw)


def test_per_sample_error_is_float32_mse_per_sample():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.bfloat16)
    target = torch.zeros(2, 2, 2, dtype=torch.bfloat16)
    err = P.per_sample_error(pred, target)
    assert err.dtype == torch.float32 and err.shape == (2,)
    torch.testing.assert_close(err, torch.tensor([(1 + 4 + 9 + 16) / 4, 4 / 4]))
    torch.testing.assert_close(P.per_sample_error(_t(1.0, -2.0), _t(0.0, 0.0)), _t(1.0, 4.0))
    with pytest.raises(ValueError):
        P.per_sample_error(torch.zeros(2, 3), torch.zeros(2, 4))


def test_dpo_sigmoid_matches_hand_computed_value():
    out = _dpo()
    torch.testing.assert_close(out.inside, _t(*INSIDE))
    _close(out.loss, (_softplus(-0.5) + _softplus(0.75) + _softplus(1.0)) / 3)
    _close(out.implicit_accuracy, 1 / 3)
    _close(out.reward_margin, (0.5 - 0.75 - 1.0) / 3)


def test_dpo_ipo_and_hinge_match_hand_computed_values():
    # IPO: (inside/beta - 1/(2 beta))^2 = ((inside - 0.5) / 10)^2 = [0, 0.125^2, 0.15^2]
    _close(_dpo(loss_type="ipo").loss, (0.0 + 0.015625 + 0.0225) / 3)
    # hinge: relu(1 - inside) = [0.5, 1.75, 2.0]
    _close(_dpo(loss_type="hinge").loss, (0.5 + 1.75 + 2.0) / 3)


def test_hdpo_scales_only_the_policy_term():
    # alpha = 0.5: inside = -5 * (0.5 * model_diff - ref_diff) = [0.25, -0.625, -1.0]
    out = _dpo(alpha=0.5)
    torch.testing.assert_close(out.inside, _t(0.25, -0.625, -1.0))
    _close(out.loss, (_softplus(-0.25) + _softplus(0.625) + _softplus(1.0)) / 3)
    # alpha = 1 is Diffusion-DPO, for every loss type
    for loss_type in P.DPO_LOSS_TYPES:
        a, b = _dpo(alpha=1.0, loss_type=loss_type), _dpo(loss_type=loss_type)
        torch.testing.assert_close(a.loss, b.loss)
        torch.testing.assert_close(a.inside, b.inside)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_policy_equal_to_reference_gives_log2_and_the_analytic_gradient(alpha):
    beta, b = 50.0, 4
    gen = torch.Generator().manual_seed(0)
    ref_w, ref_l = torch.rand(b, generator=gen), torch.rand(b, generator=gen)
    model_w, model_l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    ref_w.requires_grad_(True), ref_l.requires_grad_(True)
    # alpha != 1 shifts the logit by (alpha - 1)(m_w - m_l) even when model == ref; take m_w == m_l
    if alpha != 1.0:
        with torch.no_grad():
            model_l.copy_(model_w)
            ref_l.copy_(ref_w)
    out = P.diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=beta, alpha=alpha)
    torch.testing.assert_close(out.inside, torch.zeros(b))
    _close(out.loss, math.log(2.0))
    out.loss.backward()
    # d loss/d inside_i = -sigmoid(-0) / B = -1/(2B); d inside_i/d m_w = -0.5 beta alpha
    expected = 0.25 * beta * alpha / b
    torch.testing.assert_close(model_w.grad, torch.full((b,), expected))
    torch.testing.assert_close(model_l.grad, torch.full((b,), -expected))
    # descent lowers the winner's error and raises the loser's; the reference stays fixed
    assert (model_w.grad > 0).all() and (model_l.grad < 0).all()
    assert ref_w.grad is None and ref_l.grad is None


def test_mask_drops_pairs_and_all_masked_backpropagates_zero():
    out = _dpo(mask=torch.tensor([True, False, True]))
    _close(out.loss, (_softplus(-0.5) + _softplus(1.0)) / 2)
    _close(out.implicit_accuracy, 1 / 2)
    _close(out.reward_margin, (0.5 - 1.0) / 2)
    assert out.inside.shape == (3,)

    model_w, model_l = _t(*M_W, grad=True), _t(*M_L, grad=True)
    for loss_type in P.DPO_LOSS_TYPES:
        out = P.diffusion_dpo_loss(model_w, model_l, _t(*R_W), _t(*R_L), beta=BETA,
                                   loss_type=loss_type, mask=torch.zeros(3, dtype=torch.bool))  # fmt: skip
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        out.loss.backward()
        assert torch.equal(model_w.grad, torch.zeros(3)) and torch.equal(model_l.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="bool"):
        _dpo(mask=torch.ones(3))


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        _dpo(loss_type="logistic")
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            P.diffusion_dpo_loss(_t(*M_W), _t(*M_L), _t(*R_W), _t(*R_L), beta=beta)
    with pytest.raises(ValueError, match="alpha"):
        _dpo(alpha=0.0)
    with pytest.raises(ValueError, match="shape"):
        P.diffusion_dpo_loss(_t(1.0, 2.0), _t(1.0), _t(1.0, 2.0), _t(1.0, 2.0), beta=1.0)


def test_kto_matches_hand_computed_value_with_clamped_batch_baseline():
    # g = ref - model = [0.1, -0.1, 0.0, -0.2]; mean -0.05 -> kl = max(0, .) = 0
    # inside = sign * 2 * g = [0.2, -0.2, -0.0, 0.4]
    desirable = torch.tensor([True, True, False, False])
    out = P.diffusion_kto_loss(_t(0.1, 0.3, 0.2, 0.4), _t(0.2, 0.2, 0.2, 0.2), desirable, beta=2.0, lambda_u=1.5)
    torch.testing.assert_close(out.inside, _t(0.2, -0.2, 0.0, 0.4))

    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    expected = (1 - sig(0.2) + 1 - sig(-0.2) + 1.5 * (1 - sig(0.0)) + 1.5 * (1 - sig(0.4))) / 4
    _close(out.loss, expected)
    _close(out.implicit_accuracy, 0.5)
    _close(out.reward_margin, (0.2 - 0.2 + 0.0 + 0.4) / 4)

    # positive batch mean: g = [0.2, 0.1, 0.0, -0.1], kl = 0.05
    # inside = 2 * sign * (g - 0.05) = [0.3, 0.1, 0.1, 0.3]
    out = P.diffusion_kto_loss(_t(0.1, 0.1, 0.3, 0.3), _t(0.3, 0.2, 0.3, 0.2), desirable, beta=2.0)
    torch.testing.assert_close(out.inside, _t(0.3, 0.1, 0.1, 0.3))
    _close(out.loss, (2 * (1 - sig(0.3)) + 2 * (1 - sig(0.1))) / 4)
    _close(out.implicit_accuracy, 1.0)

    # a given baseline is used as is (not clamped): kl = -0.1 -> inside = 2 * sign * (g + 0.1)
    out = P.diffusion_kto_loss(_t(0.1, 0.1, 0.3, 0.3), _t(0.3, 0.2, 0.3, 0.2), desirable.int(), beta=2.0,
                               kl=torch.tensor(-0.1))  # fmt: skip
    torch.testing.assert_close(out.inside, _t(0.6, 0.4, -0.2, 0.0))


def test_kto_rewards_desirable_samples_the_policy_denoises_better():
    ref, kl = _t(0.2), torch.tensor(0.0)
    yes, no = torch.tensor([True]), torch.tensor([False])
    better = P.diffusion_kto_loss(_t(0.1), ref, yes, beta=5.0, kl=kl).loss
    worse = P.diffusion_kto_loss(_t(0.3), ref, yes, beta=5.0, kl=kl).loss
    assert better < worse
    # undesirable samples: the opposite
    assert P.diffusion_kto_loss(_t(0.3), ref, no, beta=5.0, kl=kl).loss < P.diffusion_kto_loss(
        _t(0.1), ref, no, beta=5.0, kl=kl).loss  # fmt: skip
    # and descent lowers desirable errors, raises undesirable ones; the reference gets no gradient
    model, ref = _t(0.2, 0.2, 0.2, grad=True), _t(0.25, 0.15, 0.2, grad=True)
    P.diffusion_kto_loss(model, ref, torch.tensor([True, False, True]), beta=5.0).loss.backward()
    assert model.grad[0] > 0 and model.grad[1] < 0 and model.grad[2] > 0
    assert ref.grad is None


def test_kto_rejects_bad_arguments():
    for beta in (0.0, -2.0):
        with pytest.raises(ValueError, match="beta"):
            P.diffusion_kto_loss(_t(0.1), _t(0.2), torch.tensor([True]), beta=beta)
    with pytest.raises(ValueError, match="desirable"):
        P.diffusion_kto_loss(_t(0.1, 0.2), _t(0.2, 0.2), torch.tensor([True]), beta=1.0)


def test_reward_weighted_loss_detaches_the_weights():
    errors, weights = _t(1.0, 2.0, 3.0, grad=True), _t(0.5, 1.0, 0.0, grad=True)
    loss = P.reward_weighted_loss(errors, weights)
    _close(loss, (0.5 + 2.0 + 0.0) / 3)
    _close(P.reward_weighted_loss(errors, weights, normalize=True), 2.5 / 1.5)
    loss.backward()
    torch.testing.assert_close(errors.grad, _t(0.5, 1.0, 0.0) / 3)
    assert weights.grad is None


def test_winner_preserving_scale_follows_the_sdpo_bound():
    gw = _t(1.0, 0.0)
    assert P.winner_preserving_scale(gw, _t(1.0, 1.0)) == pytest.approx(1.0)  # (1-0)*1/1
    assert P.winner_preserving_scale(gw, _t(1.0, 1.0), mu=0.5) == pytest.approx(0.5)
    assert P.winner_preserving_scale(gw, _t(4.0, 0.0)) == pytest.approx(0.25)
    assert P.winner_preserving_scale(gw, _t(0.5, 0.0)) == pytest.approx(1.0)  # bound 2, capped
    assert P.winner_preserving_scale(gw, _t(-1.0, 3.0)) == 1.0  # loser term helps the winner
    assert P.winner_preserving_scale(gw, _t(0.0, 3.0), max_scale=2.0) == 2.0
    # the guarantee: the update -(g_w - lam g_l) lowers the winner loss by >= mu ||g_w||^2
    gen = torch.Generator().manual_seed(0)
    for mu in (0.0, 0.3):
        for _ in range(20):
            a, b = torch.randn(2, 3, 8, 8, generator=gen)
            lam = P.winner_preserving_scale(a, b, mu=mu)
            assert 0.0 <= lam <= 1.0
            assert float(a.flatten() @ (a - lam * b).flatten()) >= mu * float(a.pow(2).sum()) - 1e-4
    with pytest.raises(ValueError, match="mu"):
        P.winner_preserving_scale(gw, gw, mu=1.5)
