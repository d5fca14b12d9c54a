"""DiffusionNFT: the loss against a hand computation, the old policy, learning, exact resume, one-line errors."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewards
from conftest import assert_one_line_errors, read_metrics, validation_gain
from imgalign.cli import main
from imgalign.losses.nft import nft_loss, optimality_probability
from imgalign.train.nft import NftConfig, old_policy, old_policy_decay, update_old_policy
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from rewards import Reward, RewardInfo

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


class Brightness(Reward):
    """Mean pixel value, with no gradient (a judge: NFT never differentiates the reward)."""

    info = RewardInfo(name="test-nft-bright", inputs=("images",), differentiable=False)

    def _score(self, images, prompts=None, **_):
        return images.mean(dim=(1, 2, 3)).detach()


rewards.register("test-nft-bright", lambda **kw: Brightness(), overwrite=True)


def _overrides(pipe: str, out: Path, size: int = 32, **extra) -> list[str]:
    base = {"pipeline": pipe, "output_dir": str(out), "reward": "test-nft-bright", "data.prompts": json.dumps(PROMPTS),
            "sampling.num_steps": 4, "sampling.height": size, "sampling.width": size, "lora.rank": 4,
            "train.batch_size": 2, "train.report_to": "[]", "validation.num_images": 0, "nft.group_size": 4}  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


# ----------------------------------------------------------------------------- the loss
def test_optimality_probability_maps_clipped_advantages_to_zero_one():
    a = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(optimality_probability(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(a, 5.0, "positive_only"), torch.tensor([0.5] * 4 + [0.75, 1.0, 1.0]))
    torch.testing.assert_close(optimality_probability(a, 5.0, "one_only"), torch.tensor([0.5] * 4 + [0.6] * 3))


def test_nft_loss_on_one_element_by_hand():
    """v = 1, v_old = 0, target 0.5, t = 0.5, beta = 0.5: v+ = 0.5 (no error), v- = -0.5 (error 1)."""
    v, v_old, target, r = torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 0.5), torch.tensor([0.25])
    plain = nft_loss(v, v_old, target, 0.5, r, beta=0.5, adaptive_weighting=False)
    assert float(plain.loss) == pytest.approx((0.25 * 0.0 + 0.75 * 1.0) / 0.5)
    # adaptive: x0 errors t (target - v+-) = 0 and 0.5, each squared over its own mean |.| (floor 1e-5)
    adaptive = nft_loss(v, v_old, target, 0.5, r, beta=0.5, scale=5.0)
    assert float(adaptive.loss) == pytest.approx(5.0 * (0.25 * 0.0 + 0.75 * 0.25 / 0.5) / 0.5)


def test_nft_loss_equals_the_released_scripts_x0_form():
    """The loss as ``train_nft_sd3.py`` writes it: x0-predictions of the implicit policies, adaptive weights."""
    g = torch.Generator().manual_seed(0)
    B, beta, clip = 3, 0.1, 5.0
    x0, eps = torch.randn(B, 2, 3, 3, generator=g), torch.randn(B, 2, 3, 3, generator=g)
    v, v_old = torch.randn(B, 2, 3, 3, generator=g), torch.randn(B, 2, 3, 3, generator=g)
    t = torch.tensor([0.9, 0.5, 0.1]).view(B, 1, 1, 1)
    r = torch.tensor([0.2, 0.5, 1.0])
    xt = (1 - t) * x0 + t * eps

    def branch(prediction):
        x0_hat = xt - t * prediction
        weight = (x0_hat.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
        return ((x0_hat - x0) ** 2 / weight).mean(dim=(1, 2, 3))

    positive = branch(beta * v + (1 - beta) * v_old)
    negative = branch((1 + beta) * v_old - beta * v)
    expected = ((r * positive / beta + (1 - r) * negative / beta) * clip).mean()
    out = nft_loss(v, v_old, eps - x0, t.flatten(), r, beta=beta, scale=clip)
    torch.testing.assert_close(out.loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.positive, positive.float(), rtol=1e-5, atol=1e-6)


def test_at_the_old_policy_the_gradient_is_the_advantage_weighted_flow_matching_gradient():
    """d/dv of clip * mean(r L+ + (1 - r) L-) / beta at v = v_old is 2 A (v_old - target) / N, whatever beta."""
    g = torch.Generator().manual_seed(1)
    v_old, target = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    advantages = torch.tensor([-7.0, -1.0, 0.5, 3.0])
    r = optimality_probability(advantages, 5.0)
    for beta in (1.0, 0.1):
        v = v_old.clone().requires_grad_(True)
        nft_loss(v, v_old, target, 0.7, r, beta=beta, scale=5.0, adaptive_weighting=False).loss.backward()
        expected = 2 * advantages.clamp(-5, 5).view(4, 1) * (v_old - target) / v_old.numel()
        torch.testing.assert_close(v.grad, expected)


# ----------------------------------------------------------------------------- the old policy
def test_old_policy_decay_schedules_are_the_released_decay_types():
    type1 = NftConfig()  # decay_type 1: min(0.001 step, 0.5)
    assert [old_policy_decay(s, type1) for s in (0, 100, 499, 2000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    type2 = NftConfig(old_decay_start=75, old_decay_rate=0.0075, old_decay_max=0.999)
    assert [old_policy_decay(s, type2) for s in (10, 75, 175, 1000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def test_the_old_policy_is_a_soft_updated_copy_swapped_in_for_its_forwards():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    trainee = types.SimpleNamespace(trainable={"w": w}, old=None, old_rollout=-1,
                                    cfg=types.SimpleNamespace(nft=NftConfig(old_decay_rate=0.25, updates_per_rollout=2)))  # fmt: skip
    assert update_old_policy(trainee, 0) == 0.0 and torch.equal(trainee.old["w"], w.detach())  # a copy at the start
    with torch.no_grad():
        w += 4.0  # training moves theta to [5, 6]
    eta = update_old_policy(trainee, 1)  # rollout 1 starts after 2 optimizer steps: eta = 0.25 * 2
    assert eta == 0.5 and torch.equal(trainee.old["w"], torch.tensor([3.0, 4.0]))
    assert update_old_policy(trainee, 1) == 0.5 and torch.equal(trainee.old["w"], torch.tensor([3.0, 4.0]))  # once
    with old_policy(trainee):
        assert torch.equal(w.detach(), torch.tensor([3.0, 4.0]))
    assert torch.equal(w.detach(), torch.tensor([5.0, 6.0])) and torch.equal(trainee.old["w"], torch.tensor([3.0, 4.0]))


# ----------------------------------------------------------------------------- runs
def test_nft_raises_the_brightness_of_the_shapes_model(tmp_path):
    """Four CFG-free NFT steps on the shipped Shapes model (16x16 for speed): the fixed-seed validation gets brighter."""
    from pipelines.adapter import DiffusionAdapter
    from imgalign.train.nft import function_evaluations

    out = tmp_path / "bright"
    overrides = _overrides("shapes", out, size=16, train__max_steps=4, optim__lr=3e-3, nft__kl_weight=0,
                           validation__num_images=4, validation__every=4,
                           lora__target_modules="[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_out]")  # fmt: skip
    images_through_the_denoiser, original = [], DiffusionAdapter.predict

    def counting(self, latents, *args, **kwargs):
        images_through_the_denoiser.append(latents.shape[0])
        return original(self, latents, *args, **kwargs)

    DiffusionAdapter.predict = counting
    try:
        assert main(["train", "nft", *overrides]) == 0
    finally:
        DiffusionAdapter.predict = original
    metrics = read_metrics(out)
    before, after = validation_gain(metrics, 4)
    assert after > before + 0.15, (before, after)
    steps = [m for m in metrics if "loss" in m]
    assert steps[-1]["reward_mean"] > steps[0]["reward_mean"]
    assert all(m["old_decay"] == pytest.approx(0.001 * (m["step"] - 1)) for m in steps)  # decay_type 1
    # the counted evaluations are the denoiser's: 4 rollouts of 8 images x 4 steps, then per update 8 images x 3
    # times x (old + policy); the validation's 4 images x 4 steps at steps 0 and 4 come on top
    cfg = load_method_config("nft", None, overrides)
    assert steps[-1]["nfe_total"] == function_evaluations(cfg, 4) == 4 * 8 * 4 + 4 * 8 * 3 * 2
    assert sum(images_through_the_denoiser) == function_evaluations(cfg, 4) + 2 * 4 * 4
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_nft_resumes_exactly_between_and_inside_rollouts(tmp_path):
    """Two updates per rollout; the interrupted run stops inside rollout 1 (its buffer and old policy are restored)."""
    extra = dict(train__max_steps=5, train__checkpoint_every=1, train__batch_size=1, sampling__num_steps=3,
                 nft__updates_per_rollout=2, nft__train_batch_size=2, nft__old_decay_rate=0.2, optim__lr=1e-2)  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(load_method_config("nft", None, _overrides("shapes", full, size=16, **extra)))
    cfg = load_method_config("nft", None, _overrides("shapes", parts, size=16, **extra))
    assert cfg.train.gradient_accumulation_steps == 2  # one chunk of 2 images x int(3 * 0.99) times per update
    assert train(cfg, stop_after_steps=3).weights_dir is None
    train(cfg, resume="latest")
    a, b = read_metrics(full), read_metrics(parts)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for key in ("loss", "policy_loss", "kl", "old_deviation", "old_decay", "advantage_abs"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]), rtol=1e-5, atol=1e-8)
    assert [m["old_decay"] for m in a] == pytest.approx([0.0, 0.0, 0.4, 0.4, 0.5])  # eta at steps 0, 2, 4
    assert [("reward_mean" in m) for m in a] == [True, False, True, False, True]  # a rollout every other step
    for name in ("lora/pytorch_lora_weights.safetensors", "checkpoints/checkpoint-000005/extra.safetensors"):
        wa, wb = load_file(full / name), load_file(parts / name)
        assert wa.keys() == wb.keys()
        assert name.startswith("lora") or any(k.startswith("trainee.old.") for k in wa)  # the old policy is saved
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7)


def test_nft_config_errors_are_one_line(capsys):
    cases = {
        "nft.beta=0": "nft.beta must be a positive number",
        "nft.group_size=1": "nft.group_size must be >= 2",
        "nft.train_batch_size=5": "must divide the rollout's train.batch_size x nft.group_size",
        "nft.timestep_fraction=0": "nft.timestep_fraction must be in (0, 1]",
        "nft.old_decay_max=1.5": "nft.old_decay_max must be in [0, 1]",
        "nft.advantage_mode=top": "nft.advantage_mode must be one of",
        "train.gradient_accumulation_steps=7": "nft sets train.gradient_accumulation_steps",
    }
    assert_one_line_errors(main, "nft", "shapes", "test-nft-bright", cases, capsys)


def test_nft_refuses_an_epsilon_model_in_one_line(sd15_dir, tmp_path, capsys):
    assert main(["train", "nft", *_overrides(sd15_dir, tmp_path / "run", train__max_steps=1)]) == 2
    err = capsys.readouterr().err
    assert "nft trains flow-matching models" in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_process_nft_ends_with_the_same_weights_and_old_policy_on_both_processes(tmp_path):
    """Two CPU processes (gloo): gradients averaged, the std of the advantages over both rollouts."""
    import textwrap

    from conftest import launch_two_cpu_processes

    script = tmp_path / "launch_nft.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        import test_train_nft  # registers the tiny reward
        from imgalign.cli import main
        from imgalign.train import get_method, register_method

        method, kept = get_method("nft"), {{}}

        def setup(run):
            kept["trainee"], kept["rank"] = method.setup(run), run.process_index
            return kept["trainee"]

        register_method(dataclasses.replace(method, setup=setup), overwrite=True)
        code = main(sys.argv[1:])
        t = kept["trainee"]
        state = {{**{{n: p.detach().contiguous() for n, p in t.trainable.items()}},
                  **{{"old." + n: v.contiguous() for n, v in t.old.items()}}}}
        save_file(state, {str(tmp_path)!r} + f"/rank-{{kept['rank']}}.safetensors")
        sys.exit(code)
    """))
    out = tmp_path / "ddp"
    args = ["train", "nft", *_overrides("shapes", out, size=16, train__max_steps=3, train__batch_size=1,
                                        nft__old_decay_rate=0.2, optim__lr=1e-2)]  # fmt: skip
    proc = launch_two_cpu_processes(script, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank-0.safetensors"), load_file(tmp_path / "rank-1.safetensors")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k and not k.startswith("old."))
