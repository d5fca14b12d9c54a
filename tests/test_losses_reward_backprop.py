"""Reward-backprop objectives checked against their papers' formulas, by hand."""

from __future__ import annotations

import random

import pytest
import torch

from imgalign.losses import reward_backprop as L


def test_refl_loss_is_imagereward_relu_margin():
    r = torch.tensor([0.5, 1.5, 2.5, -1.0])
    # ImageReward ReFL.py: F.relu(-rewards + 2) * 1e-3, averaged over the batch
    expected = torch.relu(2 - r).mean() * 1e-3
    torch.testing.assert_close(L.refl_loss(r), expected)
    # images above the margin contribute no gradient
    r = r.clone().requires_grad_(True)
    L.refl_loss(r).backward()
    assert r.grad[2] == 0 and r.grad[0] < 0
    torch.testing.assert_close(L.refl_loss(r.detach(), margin=None, scale=0.5), -0.5 * r.detach().mean())


def test_draft_losses_maximise_the_reward():
    r = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(L.draft_loss(r, scale=2.0), torch.tensor(-4.0))
    lv = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # [n=2, B=2]
    torch.testing.assert_close(L.draft_lv_loss(lv), -lv.mean())
    torch.testing.assert_close(L.draft_lv_loss(lv.flatten()), L.draft_lv_loss(lv))


def test_imagerefl_loss_matches_the_published_combination():
    r, mse, sim = torch.tensor([0.2, 0.4]), torch.tensor(0.5), torch.tensor([0.9, 0.7])
    got = L.imagerefl_loss(r, mse, reward_scale=2.0, reward_offset=1.0, mse_weight=0.01, scale=1e-3,
                           feature_similarity=sim, feature_weight=0.1)  # fmt: skip
    expected = 1e-3 * (-(r + 1.0).mean() * 2.0 + 0.01 * mse) - 0.1 * sim.mean()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(L.imagerefl_loss(r), 1e-3 * (-r.mean()))


def test_stop_step_and_truncation_stay_in_range_and_cover_the_window():
    rng = random.Random(0)
    steps = {L.refl_stop_step([30, 39], rng) for _ in range(500)}
    assert steps == set(range(30, 40))
    with pytest.raises(ValueError, match="window"):
        L.refl_stop_step([5, 2], rng)
    draws = [L.alignprop_truncation_step(42, 5, 50, rng) for _ in range(2000)]
    assert min(draws) >= 0 and max(draws) <= 49
    assert abs(sum(draws) / len(draws) - 42) < 0.6
    assert L.alignprop_truncation_step(100, 0, 50, rng) == 49 and L.alignprop_truncation_step(-5, 0, 50, rng) == 0


def test_denoising_targets_for_epsilon_v_and_flow():
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a = torch.tensor(0.3)
    torch.testing.assert_close(L.denoising_target("epsilon", x0, eps), eps)
    torch.testing.assert_close(L.denoising_target("flow", x0, eps), eps - x0)
    v = L.denoising_target("v_prediction", x0, eps, a)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    # v recovers x0 = sqrt(a) x_t - sqrt(1-a) v (Salimans & Ho 2022)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(L.denoising_loss(eps + 1, eps), torch.tensor(1.0))
    with pytest.raises(ValueError):
        L.denoising_target("sample", x0, eps)
