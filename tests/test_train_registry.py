"""The method registry and the run skeleton: a method registered in a few lines trains, resumes and fails clearly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rewards
from imgalign.cli import build_parser, main
from imgalign.train import Method, available_methods, get_method, register_method
from imgalign.train.config import PipelineTrainingConfig
from imgalign.train.pipeline import setup_pipeline
from imgalign.train.run import StepLoss
from rewards import Reward, RewardInfo

SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


# ----------------------------------------------------------------------------- a toy method
@dataclass
class ToySection:
    target: float = 0.5  # push the denoiser's output towards this constant


@dataclass
class ToyConfig(PipelineTrainingConfig):
    method: str = "toy"
    toy: ToySection = field(default_factory=ToySection)


def toy_step(trainee, micro):
    """SAMPLE: noise for this micro-step; LOSS: the denoiser's output against a constant."""
    batch = trainee.data.batch(micro.index, micro.process_index)
    cond = trainee.encode(batch.prompts, None, guidance=False)
    schedule = trainee.adapter.schedule(2, height=trainee.height, width=trainee.width)
    n = len(batch.prompts)
    x = trainee.adapter.prepare_latents(n, trainee.height, trainee.width, generator=micro.generators("latents", n))
    out = trainee.adapter.predict(x, schedule, 0, cond)
    return StepLoss(((out - trainee.cfg.toy.target) ** 2).mean())


register_method(Method("toy", ToyConfig, setup=lambda run: setup_pipeline(run, needs_reward=False), step=toy_step,
                       help="a toy loss on the denoiser's output"), overwrite=True)  # fmt: skip


class FlatReward(Reward):
    """A reward with no gradient (like a rule-based judge)."""

    info = RewardInfo(name="test-flat", inputs=("images",), differentiable=False)

    def _score(self, images, prompts=None, **_):
        return images.detach().mean(dim=(1, 2, 3))


rewards.register("test-flat", lambda **kw: FlatReward(), overwrite=True)


def _recipe(tmp_path: Path, pipe: str, out: Path, **train) -> Path:
    recipe = {
        "method": "toy", "pipeline": pipe, "output_dir": str(out), "data": {"prompts": PROMPTS},
        "sampling": {"height": SIZE, "width": SIZE}, "lora": {"rank": 4}, "optim": {"lr": 1e-2},
        "train": {"max_steps": 6, "batch_size": 2, "checkpoint_every": 2, "report_to": [], **train},
        "validation": {"num_images": 2},
    }  # fmt: skip
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_registered_toy_method_trains_from_the_cli_and_resumes_exactly(sd15_dir, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert main(["train", "toy", "--config", str(_recipe(tmp_path, sd15_dir, full)), "toy.target=0.25"]) == 0
    recipe = _recipe(tmp_path, sd15_dir, parts)
    assert main(["train", "toy", "--config", str(recipe), "toy.target=0.25", "--stop-after-steps", "3"]) == 0
    assert not (parts / "lora").exists()
    assert main(["train", "toy", "--config", str(recipe), "toy.target=0.25", "--resume", "latest"]) == 0

    a, b = _metrics(full), _metrics(parts)
    losses = [m["loss"] for m in a]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < losses[0]  # the toy loss falls
    torch.testing.assert_close(torch.tensor([m["loss"] for m in b]), torch.tensor(losses), rtol=1e-5, atol=1e-9)
    wa = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(parts / "lora" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7)
    assert (full / "validation" / "step-000006.png").is_file()  # the shared validation grid, with no reward
    assert yaml.safe_load((full / "config.yaml").read_text())["toy"]["target"] == 0.25


def test_help_lists_the_registry_and_unknown_methods_fail_in_one_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = capsys.readouterr().out
    for name in ("refl", "draft", "imagerefl", "reward", "toy"):
        assert name in available_methods() and name in shown
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("toy"))


def test_demo_and_recipes_use_registered_method_names():
    from imgalign.shapes.demo import ALGORITHMS, EDIT_ALGORITHM

    root = Path(__file__).resolve().parents[1]
    names = set(available_methods())
    assert {a.train_method for a in (*ALGORITHMS.values(), EDIT_ALGORITHM) if a.train_method} <= names
    for recipe in (root / "recipes").glob("*.yaml"):
        assert yaml.safe_load(recipe.read_text())["method"] in names, recipe.name


def test_reward_gradient_methods_refuse_a_reward_without_gradient(sd15_dir, tmp_path, capsys):
    args = ["train", "refl", f"pipeline={sd15_dir}", "reward=test-flat", f"output_dir={tmp_path / 'flat'}",
            f"data.prompts={json.dumps(PROMPTS)}", "sampling.num_steps=6", "refl.window=[3,5]",
            f"sampling.height={SIZE}", f"sampling.width={SIZE}", "train.report_to=[]", "train.max_steps=1"]  # fmt: skip
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's loading bars
    assert last.startswith("imgalign train: error:") and "'test-flat' is not differentiable" in last
    assert not (tmp_path / "flat" / "lora").exists()


def test_alternating_pretraining_with_zero_weight_is_an_error(capsys):
    args = ["train", "refl", "--print-config", "pipeline=p", "reward=r", "refl.pretrain_alternate=true",
            "refl.pretrain_weight=0", "data.pretrain_images=x", "sampling.num_steps=40"]  # fmt: skip
    assert main(args) == 2
    assert "refl.pretrain_weight > 0" in capsys.readouterr().err
