"""Diffusion-DPO on the run skeleton, on tiny real architectures: the reference, learning, on-policy pairs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pipelines
from conftest import assert_one_line_errors
import rewards
from imgalign.cli import main
from imgalign.images import save_png
from imgalign.train.config import LoraConfig
from imgalign.train.loop import setup_trainable
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from rewards import Reward, RewardInfo

SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


class Redness(Reward):
    """Mean red minus mean green/blue, with no gradient (a judge, not a differentiable reward)."""

    info = RewardInfo(name="test-dpo-red", inputs=("images",), differentiable=False)

    def _score(self, images, prompts=None, **_):
        return (images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))).detach()


rewards.register("test-dpo-red", lambda **kw: Redness(), overwrite=True)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Reddish images preferred over bluish ones (a known, learnable preference)."""
    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(8):
        red = torch.rand(3, SIZE, SIZE, generator=g) * 0.3 + torch.tensor([0.6, 0.0, 0.0]).view(3, 1, 1)
        blue = torch.rand(3, SIZE, SIZE, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 0.6]).view(3, 1, 1)
        save_png(red, root / f"red{i}.png")
        save_png(blue, root / f"blue{i}.png")
        first_red = i % 2 == 0
        lines.append({"prompt": PROMPTS[i % 3], "image_0": f"{'red' if first_red else 'blue'}{i}.png",
                      "image_1": f"{'blue' if first_red else 'red'}{i}.png", "label": 1 if first_red else 0})  # fmt: skip
    lines.append({"prompt": PROMPTS[0], "image_0": "red0.png", "image_1": "red1.png", "label": "tie"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _overrides(pipe: str, out: Path, **extra) -> list[str]:
    base = {"pipeline": pipe, "output_dir": str(out), "data.prompts": json.dumps(PROMPTS), "sampling.num_steps": 4,
            "sampling.height": SIZE, "sampling.width": SIZE, "lora.rank": 4, "train.batch_size": 2,
            "train.report_to": "[]", "validation.num_images": 0, "dpo.num_timesteps": 20}  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_reference_is_the_base_network_with_the_lora_disabled(sd15_dir):
    base = pipelines.load(sd15_dir)
    tuned = pipelines.load(sd15_dir)
    setup_trainable(tuned, LoraConfig(rank=4))
    with torch.no_grad():
        for name, p in tuned.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking LoRA
    cond = base.encode_prompt(PROMPTS[:2], guidance_scale=1.0)
    schedule = base.schedule(20, height=SIZE, width=SIZE)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base.predict(x, schedule, 5, cond)
        with pipelines.lora_disabled(tuned):
            reference = tuned.predict(x, schedule, 5, cond)
        policy = tuned.predict(x, schedule, 5, cond)
    torch.testing.assert_close(reference, expected)
    assert (policy - expected).abs().max() > 1e-3


def test_a_dpo_update_moves_the_policy_towards_the_winners(sd15_dir, pairs_file, tmp_path):
    """One gradient step on a micro-batch makes every pair of it "correct" (inside > 0) and the loss fall below log 2."""
    from imgalign.train.loop import build_accelerator
    from imgalign.train.preference import dpo_step, setup
    from imgalign.train.run import MicroStep, Run

    cfg = load_method_config("dpo", None, _overrides(sd15_dir, tmp_path / "one", data__source="pairs",
                                                      data__pairs=str(pairs_file), train__batch_size=4, dpo__beta=50))  # fmt: skip
    trainee = setup(Run(cfg, build_accelerator(cfg.train, tmp_path / "one"), tmp_path / "one"))
    micro = MicroStep(step=0, index=0, process_index=0, seed=0)  # the same pairs, step and noise both times
    before = dpo_step(trainee, micro)
    assert float(before.loss.detach()) == pytest.approx(0.6931, abs=1e-4) and float(before.metrics["implicit_accuracy"]) == 0
    before.loss.backward()
    with torch.no_grad():
        for p in trainee.trainable.values():
            p -= 1e-2 * p.grad
    after = dpo_step(trainee, micro)
    assert float(after.loss.detach()) < float(before.loss.detach()) - 1e-3
    assert float(after.metrics["implicit_accuracy"]) == 1.0


def test_dpo_on_a_pairs_file_runs_from_the_cli_with_validation(sd15_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    args = ["train", "dpo", *_overrides(sd15_dir, out, data__source="pairs", data__pairs=str(pairs_file),
                                        train__max_steps=3, validation__num_images=2)]  # fmt: skip
    assert main(args) == 0
    metrics = [m for m in _metrics(out) if "loss" in m]
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 0: log 2
    assert all(m["grad_norm"] > 0 for m in metrics)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "step-000003.png").is_file()


def test_on_policy_dpo_labels_pairs_with_any_reward_and_resumes_exactly(sd15_dir, tmp_path):
    extra = dict(reward="test-dpo-red", train__max_steps=4, train__checkpoint_every=2, train__gradient_accumulation_steps=2,
                 dpo__candidates=3, dpo__beta=200, optim__lr=1e-3)  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(load_method_config("dpo", None, _overrides(sd15_dir, full, **extra)))
    cfg = load_method_config("dpo", None, _overrides(sd15_dir, parts, **extra))
    assert train(cfg, stop_after_steps=2).weights_dir is None
    train(cfg, resume="latest")
    a, b = _metrics(full), _metrics(parts)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "pair_gap", "implicit_accuracy"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b]), torch.tensor([m[key] for m in a]), rtol=1e-5, atol=1e-8)
    assert all(m["pair_gap"] > 0 and 0 <= m["pairs_kept"] <= 1 for m in a)
    wa = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(parts / "lora" / "pytorch_lora_weights.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7)


def test_on_policy_pairs_below_the_margin_are_dropped(sd15_dir, tmp_path):
    out = tmp_path / "margin"
    train(load_method_config("dpo", None, _overrides(sd15_dir, out, reward="test-dpo-red", train__max_steps=1,
                                                      dpo__margin=1e9)))  # fmt: skip
    (record,) = _metrics(out)
    assert record["pairs_kept"] == 0 and record["loss"] == 0 and record["grad_norm"] == 0


def test_dpo_config_errors_are_one_line(sd15_dir, capsys):
    cases = {
        "dpo.beta=0": "dpo.beta must be a positive number",
        "data.caption_dropout=1.5": "data.caption_dropout must be in [0, 1)",
        "data.source=pairs": "data.pairs=",
        "dpo.candidates=1": "dpo.candidates must be >= 2",
    }
    assert_one_line_errors(main, "dpo", sd15_dir, "test-dpo-red", cases, capsys)
