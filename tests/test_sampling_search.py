"""Test-time search samplers: speculative rejection is best-of-N without pruning, noise search
moves towards reward, searches keep their best, function evaluations are counted exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pipelines
import rewards
from imgalign.cli import main
from imgalign.sampling import (
    SAMPLERS,
    best_of_n_sample,
    check_search_options,
    noise_search_sample,
    path_search_sample,
    run_sampler,
    search_noise,
    speculative_sample,
)
from imgalign.sampling.search import path_plan
from imgalign.sampling.search.paths import _renoise
from pipelines import Schedule
from pipelines.architectures import build_pipeline

SIZE, STEPS = 32, 4
PROMPTS = ["a red circle", "two blue squares"]
SHAPES_PROMPT = "a picture of a small orange circle in the centre and a small white triangle at the bottom on a purple background"


class Brightness(rewards.Reward):
    """A reward whose optimum is known: the image's mean brightness."""

    info = rewards.RewardInfo(name="brightness", inputs=("images", "prompts"))

    def _score(self, images, prompts, **cond):
        return images.mean(dim=(1, 2, 3))


def gens(seed: int = 7, count: int = len(PROMPTS)) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def common(**extra):
    return dict(num_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE, **extra)


@pytest.fixture(scope="module", params=["sd3", "sd15", "sdxl"])  # flow Euler, DDIM (VP), Euler (sigma-scaled)
def adapter(request):
    adapter = pipelines.load(build_pipeline(request.param, "tiny", seed=0))
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


@pytest.fixture(scope="module")
def sd3():
    adapter = pipelines.load(build_pipeline("sd3", "tiny", seed=0))
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


# ---------------------------------------------------------------------------- speculative
def test_speculative_without_pruning_is_best_of_n_bit_for_bit(adapter):
    reward = Brightness()
    images, scores = best_of_n_sample(adapter, PROMPTS, reward=reward, n=2, generator=gens(), return_scores=True,
                                      **common())  # fmt: skip
    for no_pruning in ({"prune_at": ()}, {"prune_fraction": 0.0}):
        out = run_sampler("speculative", adapter, PROMPTS, reward=reward, n=2, search=no_pruning, generator=gens(),
                          return_output=True, **common())  # fmt: skip
        assert torch.equal(out.images, images)
        assert torch.equal(out.scores, scores.max(dim=1).values)
        assert out.nfe == [2 * STEPS] * len(PROMPTS)  # best-of-n's n x steps


def test_speculative_pruning_counts_evaluations_and_returns_its_best(sd3):
    reward = Brightness()
    out = speculative_sample(sd3, PROMPTS, reward=reward, n=4, prune_at=[1, 2], prune_fraction=0.5, generator=gens(),
                             return_output=True, **common())  # fmt: skip
    # 4 candidates run step 0; 2 run step 1; 1 runs steps 2 and 3.
    assert out.nfe == [4 * 1 + 2 * 1 + 1 * 2] * 2
    assert out.history["alive"] == [[2, 2], [1, 1]] and out.history["survivors"] == [1, 1]
    torch.testing.assert_close(reward(out.images, PROMPTS), out.scores, rtol=0, atol=1e-6)
    # The survivor is one of best-of-4's candidates: the same noise, the same image.
    _, all_scores = best_of_n_sample(sd3, PROMPTS, reward=reward, n=4, generator=gens(), return_scores=True, **common())
    for i in range(2):
        assert torch.isclose(all_scores[i], out.scores[i], atol=1e-5).any()


# ---------------------------------------------------------------------------- Smart-GRPO noise search
def one_step_brightness(adapter, z, prompts):
    with torch.no_grad():
        cond = adapter.encode_prompt(prompts, guidance_scale=4.0)
        sched = adapter.schedule(STEPS, height=SIZE, width=SIZE)
        return adapter.decode(adapter.pred_x0(adapter.predict(z, sched, 0, cond), sched, 0, z)).mean(dim=(1, 2, 3))


def test_search_noise_moves_the_gaussian_towards_reward_and_keeps_the_floor(sd3):
    found = search_noise(sd3, PROMPTS, reward=Brightness(), rounds=3, candidates=8, keep=2, smoothing=0.5,
                         std_floor=0.6, generator=gens(), **common())  # fmt: skip
    assert found.mean.shape == found.std.shape == found.best_noise.shape == (2, 16, 4, 4)
    assert found.nfe == 3 * 8 and found.round_best.shape == found.round_mean.shape == (3, 2)
    assert (found.std >= 0.6 - 1e-6).all() and (found.std < 1).any()  # shrunk, never below the floor
    # Draws from the refined Gaussian decode (in one step) brighter than draws from N(0, I) with the same eps.
    eps = torch.randn((2 * 16, 16, 4, 4), generator=torch.Generator().manual_seed(3))
    prompts = [p for p in PROMPTS for _ in range(16)]
    refined = found.mean.repeat_interleave(16, 0) + found.std.repeat_interleave(16, 0) * eps
    assert one_step_brightness(sd3, refined, prompts).mean() > one_step_brightness(sd3, eps, prompts).mean()
    # The best candidate's one-step score is the best of every round.
    torch.testing.assert_close(one_step_brightness(sd3, found.best_noise, PROMPTS), found.best_score, rtol=0, atol=1e-5)
    torch.testing.assert_close(found.best_score, found.round_best.max(dim=0).values)
    # Rollouts for GRPO: N(mean, std^2), prompt-major, reproducible.
    draws = found.draw(3, gens(0))
    assert draws.shape == (6, 16, 4, 4) and torch.equal(draws, found.draw(3, gens(0)))


def test_search_noise_is_batch_independent_and_starts_where_asked(sd3):
    both = search_noise(sd3, PROMPTS, reward=Brightness(), rounds=2, candidates=4, generator=gens(), **common())
    alone = search_noise(sd3, PROMPTS[1:], reward=Brightness(), rounds=2, candidates=4, generator=gens()[1:], **common())
    torch.testing.assert_close(alone.mean[0], both.mean[1], rtol=0, atol=1e-5)
    start = torch.full((16, 4, 4), 0.3)
    moved = search_noise(sd3, PROMPTS, reward=Brightness(), rounds=1, candidates=4, smoothing=0.5, init_mean=start,
                         init_std=0.5, std_floor=0.1, generator=gens(), **common())  # fmt: skip
    # After one round, mu = 0.5 * start + 0.5 * mean(kept), and the kept candidates are start + 0.5 * eps.
    assert (moved.mean - 0.3).abs().mean() < 0.5


def test_noise_search_sampler_smart_counts_and_scores(sd3):
    reward = Brightness()
    out = noise_search_sample(sd3, PROMPTS, reward=reward, n=4, rounds=2, generator=gens(), return_output=True,
                              **common())  # fmt: skip
    assert out.nfe == [2 * 4 + STEPS] * 2
    torch.testing.assert_close(reward(out.images, PROMPTS), out.scores, rtol=0, atol=1e-6)
    # The final sample starts from the best candidate: the same as sampling that noise directly.
    found = search_noise(sd3, PROMPTS, reward=reward, rounds=2, candidates=4, generator=gens(), **common())
    direct = sd3.sample(PROMPTS, latents=found.best_noise, **common())
    torch.testing.assert_close(direct, out.images, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- zero-order and path search
def test_zero_order_search_never_falls_below_its_first_round(adapter):
    reward = Brightness()
    out = noise_search_sample(adapter, PROMPTS, reward=reward, method="zero-order", n=2, rounds=2, radius=0.7,
                              generator=gens(), return_output=True, **common())  # fmt: skip
    best = torch.tensor(out.history["round_best"])  # [rounds + 1, B]: the pivot after each round
    assert best.shape == (3, 2)
    assert (best[1:] >= best[:-1]).all() and (out.scores >= best[0]).all()
    torch.testing.assert_close(out.scores, best[-1])
    torch.testing.assert_close(reward(out.images, PROMPTS), out.scores, rtol=0, atol=1e-6)
    assert out.nfe == [STEPS * (1 + 2 * 2)] * 2


def test_path_search_counts_evaluations_and_returns_the_best_finished_branch(adapter):
    reward = Brightness()
    out = path_search_sample(adapter, PROMPTS, reward=reward, n=2, branches=2, start=1, backtrack=1, advance=2,
                             generator=gens(), return_output=True, **common())  # fmt: skip
    # Rounds (i, j, k): (1, 0, 2), (2, 1, 3), (3, 2, 4); 2 paths x 2 branches denoise k - j = 2 steps each.
    assert out.history["rounds"] == [[1, 0, 2], [2, 1, 3], [3, 2, 4]]
    assert out.nfe == [2 * 1 + 2 * 2 * (2 + 2 + 2)] * 2
    # The last round scores finished images; the pick is its best, and its score is the image's.
    torch.testing.assert_close(out.scores, torch.tensor(out.history["round_best"][-1]))
    torch.testing.assert_close(reward(out.images, PROMPTS), out.scores, rtol=0, atol=1e-6)
    for best, mean in zip(out.history["round_best"], out.history["round_mean"], strict=True):
        assert all(b >= m - 1e-6 for b, m in zip(best, mean, strict=True))
    alone = path_search_sample(adapter, PROMPTS[:1], reward=reward, n=2, branches=2, start=1, backtrack=1, advance=2,
                               generator=gens()[:1], **common())  # fmt: skip
    torch.testing.assert_close(alone[0], out.images[0], rtol=0, atol=1e-5)


def test_path_plan_defaults_reach_the_last_step():
    start, rounds = path_plan(10)
    assert start == 2 and rounds == [(2, 1, 5), (5, 4, 8), (8, 7, 10)]
    for steps in range(2, 40):
        start, rounds = path_plan(steps)
        assert rounds[0][0] == start and rounds[-1][2] == steps
        assert all(j < i < k or (j < i and k == steps) for i, j, k in rounds)


class _Flow:
    is_flow = True


class _VP:
    is_flow = False

    def __init__(self):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear")


@pytest.mark.parametrize("family", ["flow", "sigma", "vp"])
def test_renoising_is_the_forward_process(family):
    """x_i from the forward marginal at level i, re-noised to level j, has the forward marginal at level j."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 200_000, generator=g) * 2 - 1
    eps_i, eps = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    if family == "flow":
        adapter, sched = _Flow(), Schedule(torch.tensor([900.0, 600.0, 300.0]), 8, 8, sigmas=torch.tensor([0.9, 0.6, 0.3, 0.0]))
        (a_i, s_i), (a_j, s_j) = (0.4, 0.6), (0.1, 0.9)  # x_t = (1 - t) x0 + t eps
        x_i = a_i * x0 + s_i * eps_i
        i, j = 1, 0
    elif family == "sigma":
        adapter, sched = _VP(), Schedule(torch.tensor([900.0, 600.0, 300.0]), 8, 8, sigmas=torch.tensor([14.0, 3.0, 1.0, 0.0]))
        (a_i, s_i), (a_j, s_j) = (1.0, 1.0), (1.0, 14.0)
        x_i = x0 + eps_i
        i, j = 2, 0
    else:
        adapter = _VP()
        sched = Schedule(torch.tensor([801, 401, 1]), 8, 8, prev_timesteps=torch.tensor([401, 1, -1]))
        ab = adapter.scheduler.alphas_cumprod
        (a_i, s_i), (a_j, s_j) = (ab[401].sqrt(), (1 - ab[401]).sqrt()), (ab[801].sqrt(), (1 - ab[801]).sqrt())
        x_i = a_i * x0 + s_i * eps_i
        i, j = 1, 0
    x_j = _renoise(adapter, sched, x_i, i, j, eps)
    residual = x_j - float(a_j) * x0  # must be s_j * N(0, 1), independent of x0
    assert abs(float(residual.mean())) < 0.01 * float(s_j) + 0.005
    assert float(residual.std()) == pytest.approx(float(s_j), rel=0.01)
    assert abs(float(torch.corrcoef(torch.cat([residual, x0]))[0, 1])) < 0.01


def test_path_search_refuses_a_multistep_scheduler():
    adapter = pipelines.load(build_pipeline("sd15", "tiny", seed=0))
    from diffusers import DPMSolverMultistepScheduler

    adapter.set_scheduler(DPMSolverMultistepScheduler.from_config(adapter.scheduler.config))
    with pytest.raises(ValueError, match="set_scheduler\\('ddim'\\)"):
        path_search_sample(adapter, PROMPTS, reward=Brightness(), generator=gens(), **common())
    with pytest.raises(ValueError, match="speculative pruning"):
        speculative_sample(adapter, PROMPTS, reward=Brightness(), generator=gens(), **common())


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("sampler, options, message", [
    ("noise-search", {"method": "random"}, "method must be 'smart' or 'zero-order'"),
    ("noise-search", {"keep": 9}, "keep must be <= the candidates"),
    ("noise-search", {"smoothing": 1.0}, "smoothing must be in [0, 1)"),
    ("noise-search", {"std_floor": -1.0}, "std_floor must be"),
    ("noise-search", {"method": "zero-order", "radius": 0.0}, "radius must be in (0, 1]"),
    ("noise-search", {"rounds": 0}, "rounds must be an integer >= 1"),
    ("noise-search", {"branches": 2}, "noise-search has no option 'branches'"),
    ("path-search", {"start": 4}, "start must be a step in [1, num_steps - 1 = 3]"),
    ("path-search", {"backtrack": 2, "advance": 2}, "advance must be an integer > backtrack"),
    ("speculative", {"prune_at": [0]}, "prune_at steps must be in [1, num_steps - 1 = 3]"),
    ("speculative", {"prune_fraction": 1.0}, "prune_fraction must be in [0, 1)"),
])  # fmt: skip
def test_bad_search_options_raise_one_line_errors_naming_the_option(sampler, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        check_search_options(sampler, n=8, num_steps=STEPS, **options)
    assert "\n" not in str(err.value)


def test_run_sampler_knows_the_search_samplers_and_wants_a_reward(sd3):
    assert {"noise-search", "path-search", "speculative"} <= set(SAMPLERS)
    for name in ("noise-search", "path-search", "speculative"):
        with pytest.raises(ValueError, match=f"the {name} sampler needs a reward"):
            run_sampler(name, sd3, PROMPTS, generator=gens(), **common())
    with pytest.raises(ValueError, match="search options are for"):
        run_sampler("ode", sd3, PROMPTS, search={"rounds": 2}, **common())
    out = run_sampler("ode", sd3, PROMPTS, generator=gens(), return_output=True, **common())
    assert out.scores is None and out.nfe == [STEPS] * 2


# ---------------------------------------------------------------------------- CLI and demo
@pytest.mark.parametrize("sampler, flags, nfe", [
    ("speculative", ["--best-of", "4", "--prune-at", "1,2"], 4 + 2 + 1 * 1),
    ("noise-search", ["--best-of", "3", "--search-rounds", "2"], 2 * 3 + 3),
    ("noise-search", ["--best-of", "2", "--search-method", "zero-order", "--search-rounds", "1"], 3 * (1 + 2)),
    ("path-search", ["--best-of", "2", "--branches", "2", "--path-start", "1"], 2 * 1 + 2 * 2 * (2 + 2)),
    ("best-of-n", ["--best-of", "2"], 2 * 3),
])  # fmt: skip
def test_cli_sample_writes_scores_and_function_evaluations(sampler, flags, nfe, tmp_path):
    out = tmp_path / "out"
    code = main(["sample", "--pipeline", "shapes", "--prompt", SHAPES_PROMPT, "--num-images", "1", "--steps", "3",
                 "--guidance", "3", "--seed", "5", "--sampler", sampler, "--sampler-reward", "shapes-verifier", *flags,
                 "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 1 and all(r["sampler"] == sampler and r["nfe"] == nfe for r in records)
    assert all(isinstance(r["score"], float) and math.isfinite(r["score"]) for r in records)
    assert (out / "0000.png").is_file()


def test_cli_eval_reports_function_evaluations(tmp_path):
    code = main(["eval", "--pipeline", "shapes", "--prompt-set", "shapes-heldout-eval", "--num-prompts", "2",
                 "--images-per-prompt", "1", "--steps", "3", "--guidance", "3", "--sampler", "speculative",
                 "--best-of", "4", "--prune-fraction", "0.5", "--sampler-reward", "shapes-verifier",
                 "--reward", "shapes-oracle", "--device", "cpu", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["nfe_per_image"] == 4 * 1 + 2 * 1 + 1 * 1  # default pruning before steps 1 and 2 of 3


@pytest.mark.parametrize("flags, message", [
    (["--sampler", "speculative", "--branches", "2"], "--branches is an option of --sampler path-search"),
    (["--sampler", "noise-search", "--search-radius", "0.5"], "--search-radius is not an option of --search-method smart"),
    (["--sampler", "path-search", "--path-start", "9"], "--sampler path-search: path-search start must be a step"),
    (["--sampler", "speculative", "--prune-at", "x"], "--prune-at takes comma-separated step numbers"),
])  # fmt: skip
def test_cli_refuses_bad_search_flags_in_one_line(flags, message, tmp_path, capsys):
    code = main(["sample", "--pipeline", "shapes", "--prompt", SHAPES_PROMPT, "--steps", "3",
                 "--sampler-reward", "shapes-verifier", *flags, "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_demo_runs_the_search_samplers_with_the_learned_reward(tmp_path):
    from imgalign.shapes.demo import ALGORITHMS, TRAIN_REWARD, check_algorithm, run_demo

    for name in ("noise-search", "path-search", "speculative"):
        assert check_algorithm(name).sampler == name and ALGORITHMS[name].train_method is None
    report = run_demo(tmp_path, algo="speculative", num_prompts=2, images_per_prompt=1, sample_steps=2,
                      log=lambda _: None)  # fmt: skip
    method = report["methods"]["speculative"]
    assert report["settings"]["train_reward"] == TRAIN_REWARD
    assert method["nfe_per_image"] == 14 * 1 + 7 * 1  # pruned once, before step 1 of 2
    assert "oracle/colour" in method["gains"] and (tmp_path / "after_speculative.png").is_file()
