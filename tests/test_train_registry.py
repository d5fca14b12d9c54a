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


# ----------------------------------------------------------------------------- fp16 loss scaling
def _overflowed_scaler() -> torch.amp.GradScaler:
    """A CPU GradScaler whose state moved: one overflow (scale halved), then one finite step."""
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    for grad in (float("inf"), 1.0):
        scaler.scale(param.sum()).backward()
        param.grad[1] = grad
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return scaler


def test_checkpoints_save_and_restore_the_loss_scaler_state(tmp_path):
    from imgalign.train.checkpoint import CheckpointManager, TrainerState

    scaler = _overflowed_scaler()
    assert scaler.get_scale() == 2.0**15 and scaler.state_dict()["_growth_tracker"] == 1
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    manager = CheckpointManager(tmp_path / "checkpoints")
    path = manager.save(TrainerState(step=2), trainable={"p": param}, optimizer=opt, lr_scheduler=sched, scaler=scaler)
    assert json.loads((path / "scaler.json").read_text())["scale"] == 2.0**15  # JSON: nothing to unpickle
    resumed = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)  # what a resumed run builds
    manager.load(path, trainable={"p": param}, optimizer=opt, lr_scheduler=sched, scaler=resumed)
    assert resumed.get_scale() == 2.0**15
    assert resumed.state_dict() == scaler.state_dict()
    # a run without loss scaling writes no scaler state, and loading it into one keeps the fresh scale
    plain = manager.save(TrainerState(step=3), trainable={"p": param}, optimizer=opt, lr_scheduler=sched)
    assert not (plain / "scaler.json").exists()
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with pytest.warns(UserWarning, match="loss scale"):
        manager.load(plain, trainable={"p": param}, optimizer=opt, lr_scheduler=sched, scaler=fresh)
    assert fresh.get_scale() == 2.0**16


@pytest.fixture
def cpu_loss_scaling(monkeypatch):
    """fp16 loss scaling on CPU: accelerate keeps ``accelerator.scaler`` (and fp16 autocast) only
    on GPUs, so give the run's accelerator what it has there: a GradScaler (here a CPU one) and
    fp16 autocast. The initial scale 2**17 overflows the tiny model's fp16 gradients; 2**15 fits.

    accelerate fixes mixed precision once per process; the other tests' runs use "no", so the
    state is reset around this one (as accelerate's own tests do).
    """
    from accelerate.state import AcceleratorState

    import imgalign.train.run as run_module

    AcceleratorState._reset_state()
    built = []
    build = run_module.build_accelerator

    def build_with_scaler(loop, output_dir):
        accelerator = build(loop, output_dir)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17, growth_interval=2)
        accelerator.native_amp = True  # fp16 autocast; clip_grad_norm_ unscales first
        built.append(accelerator)
        return accelerator

    monkeypatch.setattr(run_module, "build_accelerator", build_with_scaler)
    yield built
    AcceleratorState._reset_state()


def test_an_fp16_run_resumes_with_its_loss_scale_and_skips_only_what_it_would_have(sd15_dir, tmp_path,
                                                                                   cpu_loss_scaling):  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    fp16 = ["train.mixed_precision=fp16", "model.dtype=fp32", "toy.target=0.25"]
    assert main(["train", "toy", "--config", str(_recipe(tmp_path, sd15_dir, full)), *fp16]) == 0
    recipe = _recipe(tmp_path, sd15_dir, parts)
    assert main(["train", "toy", "--config", str(recipe), *fp16, "--stop-after-steps", "3"]) == 0
    assert main(["train", "toy", "--config", str(recipe), *fp16, "--resume", "latest"]) == 0
    uninterrupted, _, resumed = (a.scaler.state_dict() for a in cpu_loss_scaling)
    assert resumed == uninterrupted
    a, b = _metrics(full), _metrics(parts)
    skipped = [m["skipped"] for m in a]
    assert 0 < sum(skipped) < len(skipped)  # overflows were skipped, and the lowered scale trains
    assert [m["skipped"] for m in b] == skipped  # a restarted scale would overflow again after the resume
    assert [m["loss_scale"] for m in b] == [m["loss_scale"] for m in a]
    torch.testing.assert_close(torch.tensor([m["loss"] for m in b]), torch.tensor([m["loss"] for m in a]),
                               rtol=1e-5, atol=1e-9)  # fmt: skip
    wa = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    wb = load_file(parts / "lora" / "pytorch_lora_weights.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-7)


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
