"""GRPO / DDPO / Smart-GRPO on tiny real architectures: exact ratios, the losses, learning, resume, two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewards
from conftest import PROMPTS, SIZE, assert_one_line_errors, launch_two_cpu_processes, read_metrics, validation_gain
from imgalign.cli import main
from imgalign.losses import group_advantages, ppo_clip_loss, step_mean_kl
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from rewards import Reward, RewardInfo


class Brightness(Reward):
    """The image's mean value: a non-differentiable judge that a policy gradient can raise."""

    info = RewardInfo(name="test-grpo-bright", inputs=("images",), differentiable=False)

    def _score(self, images, prompts=None, **_):
        return images.mean(dim=(1, 2, 3)).detach()


rewards.register("test-grpo-bright", lambda **kw: Brightness(), overwrite=True)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    from pipelines.architectures import build_pipeline

    path = tmp_path_factory.mktemp("pipe") / "sd3"
    build_pipeline("sd3", "tiny", seed=0).save_pretrained(path)
    return str(path)


def _overrides(pipe: str, out: Path, **extra) -> list[str]:
    base = {"pipeline": pipe, "output_dir": str(out), "reward": "test-grpo-bright", "data.prompts": json.dumps(PROMPTS),
            "sampling.num_steps": 4, "sampling.height": SIZE, "sampling.width": SIZE, "sampling.guidance_scale": 2.0,
            "lora.rank": 4, "train.batch_size": 2, "grpo.group_size": 2, "train.report_to": "[]",
            "validation.num_images": 0}  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


# ----------------------------------------------------------------------------- the losses on fixed numbers
def test_group_advantages_on_fixed_numbers():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / (std + 1e-4)
    adv = group_advantages(scores, clip=5.0)
    torch.testing.assert_close(adv[0:1], expected)
    assert adv[1].abs().max() == 0  # a group without spread contributes nothing
    glob = group_advantages(scores, clip=5.0, std="global")
    torch.testing.assert_close(glob[0], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (scores.std(unbiased=False) + 1e-4))
    assert group_advantages(torch.tensor([[0.0, 0.0, 0.0, 100.0]]), clip=1.0).max() == 1.0


def test_ppo_clip_loss_and_step_kl_equal_hand_computations():
    log_prob = torch.tensor([0.0, 0.5, -0.5], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 1.0, -1.0])
    out = ppo_clip_loss(log_prob, old, adv, clip_range=0.2)
    r = torch.exp(torch.tensor([0.0, 0.5, -0.5]))
    # per sample: max(-A r, -A clip(r)): [-1, -1.2 (clipped at 1.2), 0.8 (clipped at 0.8 for A < 0)]
    expected = torch.stack([-r[0], -torch.tensor(1.2), torch.tensor(0.8)]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.clipped.tolist() == [False, True, True]
    out.loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1.0 / 3, 0.0, 0.0]))  # clipped samples give no gradient
    mean, ref = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(step_mean_kl(mean, ref, torch.tensor(0.5)), torch.tensor([2.0, 2.0]))  # 1 / (2 * 0.25)


# ----------------------------------------------------------------------------- exact ratios
@pytest.mark.parametrize("step_type", ["sde", "cps"])
def test_the_first_update_recomputes_every_stored_log_prob_exactly_flow(sd3_dir, tmp_path, step_type):
    out = tmp_path / step_type
    train(load_method_config("grpo", None, _overrides(sd3_dir, out, grpo__step_type=step_type, train__max_steps=1)))
    m = read_metrics(out)[-1]
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0 and m["clip_fraction"] == 0.0, m
    assert m["skipped"] == 0.0 and math.isfinite(m["kl"]), m


def test_ddpo_ddim_ratio_is_exactly_one_and_a_second_update_moves_it(sd15_dir, tmp_path):
    """DDPO (DDIM-eta on an epsilon model): ratio 1 on the rollout's first update; the second update of the
    same rollout (updates_per_rollout=2) sees the weights moved by the first: ratio != 1."""
    out = tmp_path / "ddpo"
    train(load_method_config("grpo", None, _overrides(sd15_dir, out, model__scheduler="ddim", train__max_steps=2,
                                                      grpo__updates_per_rollout=2, grpo__train_batch_size=2,
                                                      grpo__clip_range=0.2, optim__lr=1e-2)))  # fmt: skip
    first, second = read_metrics(out)
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0
    assert second["ratio_max"] - second["ratio_min"] > 0
    assert "reward_mean" in first and "reward_mean" not in second  # one rollout for both updates


# ----------------------------------------------------------------------------- learning
def test_one_grpo_update_makes_high_advantage_transitions_likelier(tmp_path):
    """The policy-gradient property, on the shipped Shapes model: a small step down the loss's gradient
    raises the advantage-weighted log-probability of the stored transitions, sum_i A_i (log p_new_i -
    log p_old_i) > 0, and a step up the gradient lowers it."""
    from imgalign.train.grpo import grpo_step, setup
    from imgalign.train.loop import build_accelerator
    from imgalign.train.run import MicroStep, Run

    cfg = load_method_config("grpo", None, _overrides(
        "shapes", tmp_path, train__batch_size=1, grpo__group_size=6, grpo__beta=0.0, sampling__num_steps=3,
        sampling__guidance_scale=1.0, grpo__window=1, data__prompts='["a small red circle in the middle on a grey background"]'))  # fmt: skip
    trainee = setup(Run(cfg, build_accelerator(cfg.train, tmp_path), tmp_path))
    out = grpo_step(trainee, MicroStep(step=0, index=0, process_index=0, seed=0))
    r = trainee.rollout
    assert r.advantages.abs().max() > 0 and float(out.metrics["ratio_max"]) == 1.0
    out.loss.backward()
    adapter, i = trainee.adapter, r.trained[0]
    sched = adapter.schedule(3, height=SIZE, width=SIZE)
    cond = trainee.encode(r.prompts, None)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in trainee.trainable.values()))
    start = {n: p.detach().clone() for n, p in trainee.trainable.items()}

    def weighted_change(step: float) -> float:
        """sum_i A_i (log p_i after a step of length ``step`` down the loss's gradient - log p_i of the rollout)."""
        with torch.no_grad():
            for n, param in trainee.trainable.items():
                param.copy_(start[n] - step * param.grad / norm)
            new = adapter.step_with_logprob(adapter.predict(r.latents[:, i], sched, i, cond), sched, i, r.latents[:, i],
                                            method="sde", noise_level=0.7, prev_sample=r.latents[:, i + 1]).log_prob  # fmt: skip
        return float((r.advantages * (new - r.log_probs[:, i])).sum())

    assert weighted_change(1e-2) > 0 > weighted_change(-1e-2)



def test_grpo_raises_the_brightness_of_the_shapes_model(tmp_path):
    """Four GRPO steps on the shipped Shapes model (16x16, 4 SDE steps, no KL): the rollouts' reward and the
    fixed-seed validation images get brighter. The reward is never differentiated."""
    out = tmp_path / "bright"
    args = ["train", "grpo", *_overrides("shapes", out, sampling__height=16, sampling__width=16, grpo__group_size=4,
                                         sampling__guidance_scale=1.0, grpo__beta=0.0, train__max_steps=4, optim__lr=1e-2,
                                         validation__num_images=4, validation__every=4,
                                         lora__target_modules="[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_out]")]  # fmt: skip
    assert main(args) == 0
    metrics = read_metrics(out)
    before, after = validation_gain(metrics, 4)
    assert after > before + 0.15, (before, after)
    rollouts = [m["reward_mean"] for m in metrics if "reward_mean" in m and "loss" in m]
    assert len(rollouts) == 4 and rollouts[-1] > rollouts[0] + 0.1, rollouts
    assert all(m["ratio_min"] == pytest.approx(1.0) == m["ratio_max"] for m in metrics if "loss" in m)  # on-policy

def test_smart_grpo_starts_rollouts_from_the_searched_noise_and_counts_its_evaluations(sd3_dir, tmp_path):
    from imgalign.train import grpo
    from imgalign.train.grpo import function_evaluations

    starts = {}
    original = grpo.rollout

    def recording(trainee, step, process_index):
        r = original(trainee, step, process_index)
        starts[trainee.cfg.method] = r.latents[:, 0].clone()
        return r

    grpo.rollout = recording
    try:
        common = {"train__max_steps": 1, "grpo__beta": 0.0}
        train(load_method_config("grpo", None, _overrides(sd3_dir, tmp_path / "plain", **common)))
        cfg = load_method_config("smart-grpo", None, _overrides(sd3_dir, tmp_path / "smart", search__rounds=2,
                                                                 search__candidates=4, search__keep=2, **common))  # fmt: skip
        result = train(cfg)
    finally:
        grpo.rollout = original
    m = result.metrics[-1]
    assert m["nfe_search"] == 2 * 2 * 4  # prompts x rounds x candidates, one step each
    assert m["nfe_total"] == function_evaluations(cfg, 1) == 2 * 2 * 4 + 4 * 4 + 4 * 4  # search + rollout + update
    assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0
    assert not torch.equal(starts["grpo"], starts["smart-grpo"])  # same seeds, refined distribution


# ----------------------------------------------------------------------------- resume and processes
def test_resume_between_the_updates_of_one_rollout_matches_the_uninterrupted_run(sd3_dir, tmp_path):
    common = {"train__max_steps": 4, "grpo__updates_per_rollout": 2, "grpo__train_batch_size": 2, "grpo__clip_range": 0.2,
              "optim__lr": 1e-2, "train__checkpoint_every": 1}  # fmt: skip
    full = tmp_path / "full"
    train(load_method_config("grpo", None, _overrides(sd3_dir, full, **common)))
    part = tmp_path / "part"
    cfg = load_method_config("grpo", None, _overrides(sd3_dir, part, **common))
    train(cfg, stop_after_steps=1)  # inside the first rollout: its second update needs the stored buffer
    train(load_method_config("grpo", None, _overrides(sd3_dir, part, **common)), resume="latest")
    a, b = read_metrics(full), read_metrics(part)
    for key in ("loss", "ratio_mean", "ratio_max", "grad_norm"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-5), key
    wa, wb = load_file(full / "lora" / "pytorch_lora_weights.safetensors"), load_file(part / "lora" / "pytorch_lora_weights.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_two_processes_draw_different_noise_and_end_with_identical_weights(sd3_dir, tmp_path):
    import textwrap

    script = tmp_path / "launch_grpo.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        import test_train_grpo  # registers the tiny reward
        from imgalign.cli import main
        from imgalign.train import get_method, register_method, grpo

        method, kept, noise = get_method("grpo"), {{}}, []

        def setup(run):
            kept["trainee"], kept["rank"] = method.setup(run), run.process_index
            return kept["trainee"]

        original = grpo.rollout
        def recording(trainee, step, process_index):
            r = original(trainee, step, process_index)
            noise.append(r.latents[:, 0].flatten()[:16].tolist())
            return r

        grpo.rollout = recording
        register_method(dataclasses.replace(method, setup=setup), overwrite=True)
        code = main(sys.argv[1:])
        state = {{n: p.detach().contiguous() for n, p in kept["trainee"].trainable.items()}}
        save_file(state, {str(tmp_path)!r} + f"/rank-{{kept['rank']}}.safetensors")
        open({str(tmp_path)!r} + f"/noise-{{kept['rank']}}.json", "w").write(json.dumps(noise))
        sys.exit(code)
    """))
    out = tmp_path / "ddp"
    proc = launch_two_cpu_processes(script, ["train", "grpo", *_overrides(sd3_dir, out, train__max_steps=2, optim__lr=1e-2,
                                                                          grpo__beta=0.0)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    n0, n1 = (json.loads((tmp_path / f"noise-{r}.json").read_text()) for r in (0, 1))
    assert len(n0) == len(n1) == 2 and n0[0] != n1[0] and n0[0] != n0[1]  # per process and per rollout
    rank0, rank1 = load_file(tmp_path / "rank-0.safetensors"), load_file(tmp_path / "rank-1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # the updates happened


# ----------------------------------------------------------------------------- errors
def test_grpo_config_errors_are_one_line(sd15_dir, capsys):
    assert_one_line_errors(main, "grpo", sd15_dir, "test-grpo-bright", {
        "grpo.group_size=1": "grpo.group_size must be >= 2",
        "grpo.window=99": "grpo.window must be in",
        "grpo.timestep_fraction=0": "grpo.timestep_fraction must be in (0, 1]",
        "grpo.clip_range=nan": "grpo.clip_range must be a positive number",
        "grpo.beta=-1": "grpo.beta must be >= 0",
        "grpo.train_batch_size=3": "must divide the rollout's",
        "train.gradient_accumulation_steps=7": "grpo sets train.gradient_accumulation_steps",
    }, capsys)  # fmt: skip
