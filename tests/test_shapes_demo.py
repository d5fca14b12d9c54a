"""The demo, its samplers and rewards, the Shapes preference data, and the build of the shipped models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipelines
import rewards
from imgalign.cli import main
from imgalign.evaluation import evaluate
from imgalign.prompt_sets import prompt_set
from imgalign.sampling import best_of_n_sample, run_sampler
from imgalign.shapes import judge, parse_caption, render_batch, sample_scene
from imgalign.shapes.manifest import WEIGHTS_DIR


@pytest.fixture(scope="module")
def shapes_adapter():
    adapter = pipelines.load(str(WEIGHTS_DIR / "t2i"), dtype=torch.float32, device="cpu")
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


class MeanRedness(rewards.Reward):
    """A toy reward whose ranking is known: the mean red channel minus the others."""

    info = rewards.RewardInfo(name="redness", inputs=("images", "prompts"))

    def _score(self, images, prompts, **cond):
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def test_heldout_prompt_halves_are_disjoint_and_cover_the_set():
    evaluated, aligned = prompt_set("shapes-heldout-eval"), prompt_set("shapes-heldout-align")
    assert len(evaluated) == 100 and len(aligned) == 200
    assert not set(evaluated) & set(aligned)
    assert evaluated + aligned == prompt_set("shapes-heldout")


@pytest.mark.slow
def test_best_of_n_picks_the_best_candidate_per_image_and_is_batch_independent(shapes_adapter):
    prompts = prompt_set("shapes-heldout-eval")[:3]
    reward = MeanRedness()
    gens = lambda: [torch.Generator().manual_seed(7 + i) for i in range(3)]  # noqa: E731
    common = dict(num_steps=3, guidance_scale=3.0)
    images, scores = best_of_n_sample(shapes_adapter, prompts, reward=reward, n=3, generator=gens(), return_scores=True, **common)
    assert images.shape == (3, 3, 32, 32) and scores.shape == (3, 3)
    torch.testing.assert_close(reward.score(images, prompts), scores.max(dim=1).values, rtol=0, atol=1e-6)
    alone = best_of_n_sample(shapes_adapter, prompts[1:2], reward=reward, n=3, generator=gens()[1:2], **common)
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-5)
    via_run_sampler = run_sampler("best-of-n", shapes_adapter, prompts, reward=reward, n=3, generator=gens(), **common)
    torch.testing.assert_close(via_run_sampler, images, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a reward"):
        run_sampler("best-of-n", shapes_adapter, prompts, generator=gens(), **common)


def test_caption_contrast_reward_negatives_change_only_the_targeted_attribute():
    reward = rewards.load("shapes-clip-contrast", fields="colour", negatives=3)
    prompt = prompt_set("shapes-heldout-eval")[0]
    candidates = reward.candidates(prompt)
    assert candidates == reward.candidates(prompt) and candidates[0] == prompt and len(candidates) == 4
    true = parse_caption(prompt)
    for text in candidates[1:]:
        other = parse_caption(text)
        changed = [(a, b) for a, b in zip(true.shapes, other.shapes) if a != b]
        assert other.background == true.background and len(changed) == 1
        (a, b) = changed[0]
        assert (a.kind, a.size, a.position) == (b.kind, b.size, b.position) and a.colour != b.colour
    with pytest.raises(ValueError, match="fields must be among"):
        rewards.load("shapes-clip-contrast", fields="texture")


def test_caption_contrast_reward_prefers_true_colours_and_is_differentiable():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, split="heldout") for _ in range(24)]
    from imgalign.shapes import caption

    prompts = [caption(s) for s in scenes]
    images = torch.from_numpy(render_batch(scenes, 32, rng)).permute(0, 3, 1, 2).float() / 255
    reward = rewards.load("shapes-clip-contrast", fields="colour", negatives=4)
    log_p = reward.score(images, prompts)
    assert (log_p <= 0).all()
    assert log_p.exp().mean() > 0.6  # uniform over 5 candidates would be 0.2
    x = images[:2].clone().requires_grad_(True)
    reward.score(x, prompts[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_evaluate_keeps_per_image_oracle_aspects(shapes_adapter):
    prompts = prompt_set("shapes-heldout-eval")[:3]

    def sample(batch, generators):
        return shapes_adapter.sample(batch, num_steps=3, guidance_scale=3.0, generator=generators)

    result = evaluate(sample, prompts, {"shapes-oracle": rewards.load("shapes-oracle")}, images_per_prompt=2, progress=False)
    judgements = judge(result.images, [p for p in prompts for _ in range(2)])
    exact = np.array([j.exact for j in judgements], dtype=float).reshape(3, 2).mean(1)
    np.testing.assert_allclose(result.per_prompt("shapes-oracle/exact"), exact)
    assert result.per_prompt("shapes-oracle/exact").mean() == pytest.approx(result.details["shapes-oracle/attributes"]["exact_rate"])
    with pytest.raises(KeyError, match="no reward or judge aspect"):
        result.per_prompt("shapes-oracle/texture")


def test_simulated_raters_follow_the_utilities_with_noise_and_ties():
    from imgalign.shapes.preference import simulated_label

    rng = np.random.default_rng(0)
    assert simulated_label(0.9, 0.1, rng, noise=0.0, tie=0.03) == "A"
    assert simulated_label(0.1, 0.9, rng, noise=0.0, tie=0.03) == "B"
    assert simulated_label(0.50, 0.51, rng, noise=0.0, tie=0.03) == "tie"
    calls = [simulated_label(0.55, 0.5, rng, noise=0.05, tie=0.03) for _ in range(2000)]
    share = {c: calls.count(c) / len(calls) for c in ("A", "B", "tie")}
    assert share["A"] > share["B"] > 0.1 and share["tie"] > 0.1  # a close call is noisy, as with people


def test_preference_data_loads_into_the_reward_trainer(tmp_path):
    from imgalign.shapes.preference import make_preference_data
    from rewards.training import PairDataConfig, load_pairs

    prompts = prompt_set("shapes-train")[:3]
    path = make_preference_data(tmp_path, prompts, samples_per_prompt=2, render_fraction=1.0, num_steps=3, seed=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3 * 3  # 2 samples + 1 render per prompt: 3 pairs each
    for r in records:
        assert set(r["labels"]) == {"prompt", "quality"} and r["label"] in ("A", "B", "tie")
        assert set(r["utility_a"]) >= {"prompt", "quality", "overall", "colour", "shape"}
    renders = [r for r in records if "render" in r["kinds"]]
    assert all(r["utility_b" if r["kinds"][1] == "render" else "utility_a"]["overall"] == 1.0 for r in renders)
    pairs = load_pairs(str(path), PairDataConfig(image_size=32), aspects=["prompt", "quality"])
    assert len(pairs) == len(records) and pairs[0].image_a.shape == (3, 32, 32)


def test_demo_rejects_unknown_methods_in_one_line(capsys):
    from imgalign.shapes.demo import algorithm_names, check_algorithm

    for name in algorithm_names():  # every listed method runs (none is "not available yet")
        if name != "compare":
            check_algorithm(name)
    assert main(["demo", "--algo", "magic", "--out", "/tmp/unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --algo" in err[0]


def test_every_training_method_of_the_demo_resolves_to_its_checked_config(tmp_path):
    """Each method's overrides reach a config of its registered method (the slow test runs three of them)."""
    from pathlib import Path

    from imgalign.shapes.demo import ALGORITHMS, training_config
    from imgalign.train import load_method_config

    trained = {name: algo for name, algo in ALGORITHMS.items() if algo.train_method is not None}
    assert {"draft", "dpo", "tpo", "grpo", "smart-grpo", "nft"} <= set(trained)
    for name, algo in trained.items():
        cfg = training_config(algo, tmp_path / name, max_steps=3, images_dir=tmp_path / "images")
        assert cfg.method == algo.train_method and cfg.train.max_steps == 3, name
        assert cfg.output_dir == str(tmp_path / name) and cfg.data.prompts == "shapes-heldout-align", name
    # --algo nft trains as recipes/shapes_oracle_nft.yaml does (its batch aside)
    recipe = load_method_config("nft", Path(__file__).resolve().parents[1] / "recipes" / "shapes_oracle_nft.yaml", [])
    demo = training_config(ALGORITHMS["nft"], tmp_path / "nft")
    assert (demo.reward, demo.nft, demo.train.ema_decay, demo.optim.weight_decay) == \
        (recipe.reward, recipe.nft, recipe.train.ema_decay, recipe.optim.weight_decay)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["draft", "tpo", "grpo"])
def test_demo_report_has_the_documented_fields(algo, tmp_path):
    from imgalign.shapes.demo import ORACLE_METRICS, run_demo

    report = run_demo(tmp_path, algo=algo, num_prompts=2, images_per_prompt=1, sample_steps=3, train_steps=1,
                      log=lambda _: None)  # fmt: skip
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved) == {"settings", "before", "methods", "seconds"}
    assert saved["settings"]["prompt_set"] == "shapes-heldout-eval"
    draft = saved["methods"][algo]
    for metric in ORACLE_METRICS:
        gain = draft["gains"][f"oracle/{metric}"]
        assert set(gain) == {"before", "after", "gain", "ci95", "significant"}
        assert gain["gain"] == pytest.approx(gain["after"] - gain["before"])
    assert {"shapes-clip", "shapes-preference", "diversity"} <= set(draft["gains"])
    assert len(draft["reward_curve"]) >= 1 and "reward_mean" in draft["reward_curve"][0]
    for name in ("before.png", f"after_{algo}.png", "reward_curve.png", "report.md"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / algo / "config.yaml").is_file()
    if algo == "tpo":  # sampled through the routed experts
        assert (tmp_path / "tpo" / "lora" / "routing.json").is_file()


@pytest.mark.slow
def test_default_demo_is_best_of_n_with_its_curve(tmp_path):
    from imgalign.shapes.demo import DEFAULT_ALGORITHM, run_demo

    assert DEFAULT_ALGORITHM == "best-of-n"
    report = run_demo(tmp_path, num_prompts=2, images_per_prompt=2, sample_steps=3, log=lambda _: None)
    method = report["methods"]["best-of-n"]
    assert report["settings"]["train_reward"] == "shapes-verifier"
    curve = method["best_of_n_curve"]
    assert curve["n"] == [1.0, 2.0, 4.0, 8.0] and len(curve["oracle/colour"]) == 4
    # the last point of the curve is the evaluated pick itself
    assert curve["oracle/colour"][-1] == pytest.approx(method["gains"]["oracle/colour"]["after"])
    assert (tmp_path / "reward_curve.png").is_file() and (tmp_path / "after_best-of-n.png").is_file()


@pytest.mark.slow
def test_shapes_build_runs_every_stage_and_records_a_verifiable_manifest(tmp_path):
    """``imgalign shapes build --quick``: the chain of stages (not the quality of its weights)."""
    out = tmp_path / "weights"
    assert main(["shapes", "build", "--out", str(out), "--quick"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["models"]) == {"t2i", "clip", "verifier", "preference", "edit", "edit_reward"}
    assert "within_prompt_agreement_colour" in manifest["models"]["verifier"]["metrics"]
    assert "accuracy_with_ties" in manifest["models"]["preference"]["metrics"]
    assert "edit_applied" in manifest["models"]["edit"]["metrics"]
    assert main(["shapes", "verify", "--out", str(out)]) == 0
    assert pipelines.load(str(out / "edit"), dtype=torch.float32).is_edit
    preference = rewards.load(str(out / "preference"))
    images = torch.rand(2, 3, 32, 32)
    assert preference(images, prompt_set("shapes-train")[:2]).shape == (2,)
    (out / "clip" / "config.json").write_text("{}")
    assert main(["shapes", "verify", "--out", str(out)]) == 1
    assert main(["shapes", "build", "--out", str(out), "--only", "vae"]) == 2


@pytest.mark.parametrize("algo, recipe", [("draft", "shapes_verifier_draft"), ("dpo", "shapes_verifier_dpo"),
                                          ("tpo", "shapes_oracle_tpo")])  # fmt: skip
def test_the_shapes_recipe_is_the_demo_run(algo, recipe, tmp_path):
    """recipes/shapes_<labeller>_<algo>.yaml reruns the demo's training of that method exactly."""
    from pathlib import Path

    from imgalign.shapes.demo import ALGORITHMS, training_config
    from imgalign.train.config import to_dict
    from imgalign.train import load_method_config

    root = Path(__file__).resolve().parents[1]
    recipe = to_dict(load_method_config(algo, root / "recipes" / f"{recipe}.yaml", [f"output_dir={tmp_path}"]))
    demo = to_dict(training_config(ALGORITHMS[algo], tmp_path))
    assert recipe["pipeline"] == "shapes"  # a named pipeline: the recipe runs from any directory
    recipe["validation"], demo["validation"] = None, None
    # a recipe run on its own keeps checkpoints (resumable) and TensorBoard logs; the demo needs neither
    assert recipe["train"].pop("checkpoint_every") > 0 and recipe["train"].pop("report_to") == ["tensorboard"]
    demo["train"].pop("checkpoint_every"), demo["train"].pop("report_to")
    assert recipe == demo


@pytest.mark.slow
def test_edit_alignment_demo_trains_the_edit_model_and_judges_edits(tmp_path):
    from imgalign.shapes.demo import EDIT_METRICS, run_demo

    report = run_demo(tmp_path, algo="edit-refl", num_prompts=2, images_per_prompt=1, sample_steps=3, train_steps=1,
                      log=lambda _: None)  # fmt: skip
    run = report["methods"]["edit-refl"]
    assert set(run["gains"]) == {*(f"oracle/{m}" for m in EDIT_METRICS), "shapes-edit-reward"}
    assert set(report["before"]) == {f"shapes-oracle/{m}" for m in EDIT_METRICS}
    assert all(0.0 <= v <= 1.0 for v in report["before"].values())
    assert (tmp_path / "edit-refl" / "lora").is_dir() and (tmp_path / "edit_before_after.png").is_file()


def test_the_cli_sampler_choices_are_the_samplers():
    from imgalign.commands.sample import SAMPLER_CHOICES
    from imgalign.sampling import SAMPLERS

    assert SAMPLER_CHOICES == list(SAMPLERS)
