"""``imgalign eval`` and the evaluation library: determinism, intervals, oracle details, paired gains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rewards
from imgalign.cli import main
from imgalign.evaluation import EvalResult, bootstrap_interval, compare, pairwise_diversity
from imgalign.shapes import make_dataset


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.2, 20), rng.normal(0.5, 0.2, 2000)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5


def test_pairwise_diversity_is_zero_for_copies_and_positive_otherwise():
    image = torch.rand(1, 3, 8, 8)
    assert pairwise_diversity(image.expand(3, -1, -1, -1)) == 0
    assert pairwise_diversity(torch.rand(3, 3, 8, 8)) > 0.1


def test_paired_gain_interval_excludes_zero_only_for_a_real_gain():
    prompts = [f"p{i}" for i in range(40)]
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, (40, 2))
    before = EvalResult(prompts, 2, {"r": base}, np.zeros(40))
    better = EvalResult(prompts, 2, {"r": base + 0.1 + rng.normal(0, 0.02, (40, 2))}, np.zeros(40))
    same = EvalResult(prompts, 2, {"r": base + rng.normal(0, 0.02, (40, 2))}, np.zeros(40))
    assert compare(before, better, "r")["significant"] and compare(before, better, "r")["ci95"][0] > 0.05
    assert not compare(before, same, "r")["significant"]


def test_oracle_reward_scores_ground_truth_one_and_mismatches_low():
    oracle = rewards.load("shapes-oracle")
    assert not oracle.info.differentiable
    images, captions, _ = make_dataset(16, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.all(oracle(x, captions) == 1)
    assert oracle(x, captions[1:] + captions[:1]).mean() < 0.2
    assert len(oracle.last_judgements) == 16
    with pytest.raises(ValueError, match="unknown oracle aspect"):
        rewards.load("shapes-oracle", aspect="sparkle")


@pytest.mark.slow
def test_eval_command_is_deterministic_and_reports_oracle_attributes(tmp_path):
    argv = ["eval", "--pipeline", "shapes", "--prompt-set", "shapes-heldout", "--num-prompts", "3",
            "--images-per-prompt", "2", "--reward", "shapes-oracle", "--steps", "3", "--seed", "5",
            "--batch-size", "4"]  # fmt: skip  (6 images in chunks of 4: judgements must cover all)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["shapes-oracle"] == b["shapes-oracle"] and a["diversity"] == b["diversity"]
    lo, hi = a["shapes-oracle"]["ci95"]
    assert lo <= a["shapes-oracle"]["mean"] <= hi
    attributes = a["shapes-oracle/attributes"]
    assert attributes["n"] == 6 and {"acc_shape", "acc_colour", "exact_rate"} <= set(attributes)
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "report.md").is_file()


def test_eval_command_rejects_unknown_prompt_sets(tmp_path, capsys):
    code = main(["eval", "--pipeline", "shapes", "--prompt-set", "coco", "--reward", "shapes-oracle", "--out", str(tmp_path)])
    assert code == 2 and "unknown prompt set" in capsys.readouterr().err
