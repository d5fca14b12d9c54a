"""Reward-backprop trainers on tiny real architectures (CPU): gradients, learning, resume, outputs.

Tiny differentiable stand-in rewards are registered here:

* ``test-red``: mean red minus mean green/blue (images only);
* ``test-red-edit``: the same, minus the distance to the source image (an edit reward);
* ``test-similarity``: 1 - mean squared distance to ``reference_images`` (a regulariser);
* ``test-bright``: mean brightness (a second member for composite rewards);
* ``test-nan-after``: ``test-red`` that turns NaN after a number of calls.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import pipelines
import rewards
from imgalign.cli import main
from imgalign.train import reward_backprop as rb
from imgalign.train.checkpoint import list_checkpoints
from imgalign.train.config import ConfigError, LoraConfig, load_config, parse_overrides
from imgalign.train.data import Batch
from imgalign.train.forward_process import noise_to_step, target_at_step
from imgalign.train.loop import TrainingDiverged, setup_trainable, step_generators
from imgalign.train.pipeline import build_data, encode, score
from imgalign.train.registry import load_method_config
from imgalign.train.run import MicroStep, train
from conftest import launch_two_cpu_processes
from pipelines.architectures import build_pipeline
from rewards import Reward, RewardInfo

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


# ----------------------------------------------------------------------------- tiny rewards
def _redness(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class RedReward(Reward):
    info = RewardInfo(name="test-red", inputs=("images",))

    def _score(self, images, prompts=None, **_):
        return _redness(images)


class RedEditReward(Reward):
    info = RewardInfo(name="test-red-edit", inputs=("images", "source_images"))

    def _score(self, images, prompts=None, source_images=None):
        return _redness(images) - (images - source_images).abs().mean(dim=(1, 2, 3))


class SimilarityReward(Reward):
    info = RewardInfo(name="test-similarity", inputs=("images", "reference_images"))

    def _score(self, images, prompts=None, reference_images=None):
        return 1 - ((images - reference_images) ** 2).mean(dim=(1, 2, 3))


class BrightReward(Reward):
    info = RewardInfo(name="test-bright", inputs=("images",))

    def _score(self, images, prompts=None, **_):
        return images.mean(dim=(1, 2, 3))


class NanAfterReward(RedReward):
    calls = 0

    def __init__(self, after: int = 2):
        super().__init__()
        self.after = after

    def _score(self, images, prompts=None, **_):
        NanAfterReward.calls += 1
        r = _redness(images)
        return r * float("nan") if NanAfterReward.calls > self.after else r


for _name, _factory in {"test-red": RedReward, "test-red-edit": RedEditReward, "test-bright": BrightReward,
                        "test-similarity": SimilarityReward, "test-nan-after": NanAfterReward}.items():  # fmt: skip
    rewards.register(_name, lambda _f=_factory, **kw: _f(**kw), overwrite=True)


# ----------------------------------------------------------------------------- helpers
# (the tiny pipelines and the image folder are the `pipe_dirs` / `image_folder` fixtures of conftest.py)
def _overrides(pipe_dir: str, out: Path, **extra) -> list[str]:
    base = {
        "pipeline": pipe_dir, "reward": "test-red", "output_dir": str(out), "data.prompts": json.dumps(PROMPTS),
        "sampling.num_steps": 6, "sampling.height": SIZE, "sampling.width": SIZE, "refl.window": "[3,5]",
        "lora.rank": 4, "train.batch_size": 2, "train.report_to": "[]", "validation.num_images": 0,
    }  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- gradient flow
GRADIENT_CASES = [
    ("refl", "sd15", {}),  # epsilon
    ("refl", "sd2-v", {}),  # v-prediction
    ("refl", "sd3", {}),  # flow
    ("refl", "flux", {}),  # flow, packed latents, guidance-distilled
    ("refl", "sdxl", {"sampling.detach_uncond": True}),
    ("refl", "instruct-pix2pix", {}),  # edit, epsilon, with an edit reward
    ("refl", "flux-kontext", {}),  # edit, flow
    ("draft", "sd15", {"draft.k": 2}),
    ("draft", "sd3", {"draft.k": 2}),
    ("draft", "sd2-v", {"draft.lv_samples": 2}),  # DRaFT-LV
    ("draft", "flux", {"draft.truncation_mean": 4, "draft.truncation_std": 1}),  # AlignProp
    ("imagerefl", "sd15", {"imagerefl.regularizer": "test-similarity", "imagerefl.regularizer_weight": 0.1}),
    ("imagerefl", "sd2-v", {}),
    ("imagerefl", "sd3", {}),
]


@pytest.mark.parametrize(("method", "family", "extra"), GRADIENT_CASES, ids=[f"{m}-{f}" for m, f, _ in GRADIENT_CASES])
def test_gradient_reaches_lora_for_every_method_and_family(method, family, extra, image_folder, tmp_path):
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    named = setup_trainable(adapter, LoraConfig(rank=4))
    edit = adapter.is_edit
    overrides = {"pipeline": "unused", "reward": "test-red-edit" if edit else "test-red", "sampling.num_steps": 6,
                 "sampling.height": SIZE, "sampling.width": SIZE, "refl.window": [3, 5],
                 "imagerefl.start_step": 2, "imagerefl.window": [3, 5], "data.images": str(image_folder), **extra}  # fmt: skip
    cfg = load_config(rb.RewardBackpropConfig, None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()], method=method)
    data = build_data(cfg, adapter, 1, SIZE, SIZE, images=True) if (edit or method == "imagerefl") else None
    batch = data.batch(0) if data else Batch(PROMPTS[:2])
    cond = encode(adapter, cfg, batch.prompts, batch.images)
    schedule = adapter.schedule(6, height=SIZE, width=SIZE)
    ctx = rb.StepContext(adapter, cfg, cond, schedule, batch, MicroStep(step=0, index=0, process_index=0, seed=0))
    sampled = rb.SAMPLE_FOR_METHOD[method](ctx)
    reward = rewards.load(cfg.reward)
    r = score(reward, sampled.images, sampled.prompts, sampled.source_images)
    similarity = None
    if cfg.imagerefl.regularizer and method == "imagerefl":
        similarity = rewards.load(cfg.imagerefl.regularizer)(sampled.images, None, reference_images=batch.images)
    loss, _ = rb.method_loss(cfg, r, sampled, similarity)
    loss.backward()
    grads = [p.grad for p in named.values() if p.grad is not None]
    assert named and grads, "no LoRA parameter received a gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert not any(p.grad is not None for n, p in adapter.denoiser.named_parameters() if "lora_" not in n)


def test_full_fine_tuning_trains_every_denoiser_weight():
    adapter = pipelines.load(build_pipeline("sd15", "tiny"))
    named = setup_trainable(adapter, LoraConfig(enabled=False))
    assert len(named) == len(list(adapter.denoiser.parameters()))
    assert not any(p.requires_grad for p in adapter.vae.parameters())


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl", "sd3", "instruct-pix2pix"])
def test_noising_and_target_are_consistent_with_pred_x0(family):
    """pred_x0(target(x0, eps), noise_to_step(x0, eps)) == x0 for every parameterisation."""
    adapter = pipelines.load(build_pipeline(family, "tiny"))
    schedule = adapter.schedule(6, height=SIZE, width=SIZE)
    g = torch.Generator().manual_seed(0)
    channels = 4 if family != "sd3" else 16
    x0, eps = torch.randn(2, channels, 4, 4, generator=g), torch.randn(2, channels, 4, 4, generator=g)
    for i in (0, 3, 5):
        x = noise_to_step(adapter, schedule, i, x0, eps)
        target = target_at_step(adapter, schedule, i, x0, eps)
        torch.testing.assert_close(adapter.pred_x0(target, schedule, i, x), x0, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def trained_red(pipe_dirs, tmp_path_factory):
    """ReFL (linear loss) on the red-channel reward, tiny SD1.5, 12 steps."""
    out = tmp_path_factory.mktemp("refl-red")
    overrides = _overrides(pipe_dirs["sd15"], out, refl__margin="null", refl__scale=1.0, optim__lr=1e-2,
                           train__max_steps=12, validation__every=6, validation__num_images=2,
                           train__report_to="[tensorboard]")  # fmt: skip
    result = train(load_method_config("refl", None, overrides))
    return out, result


def test_refl_raises_the_reward(trained_red):
    out, result = trained_red
    validation = [m for m in _metrics(out) if "val_reward_mean" in m]
    first, last = validation[0], validation[-1]
    assert first["step"] == 0 and last["step"] == 12
    print(f"validation reward (fixed seeds): step 0 {first['val_reward_mean']:.4f} -> step 12 {last['val_reward_mean']:.4f}")
    assert last["val_reward_mean"] > first["val_reward_mean"] + 0.05
    assert (out / "validation" / "step-000012.png").is_file()
    assert any((out / "logs").rglob("events.out.tfevents*"))  # TensorBoard tracker wrote its log
    assert (out / "config.yaml").is_file() and result.weights_dir == out / "lora"
    logged = _metrics(out)[1]
    for key in ("loss", "reward_mean", "reward_std", "grad_norm", "lr", "step_time_s", "samples_per_s"):
        assert key in logged


def test_saved_lora_changes_plain_diffusers_output(trained_red, pipe_dirs):
    out, _ = trained_red
    pipe = DiffusionPipeline.from_pretrained(pipe_dirs["sd15"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=6, height=SIZE, width=SIZE, output_type="pt")

    def run():
        return pipe(PROMPTS[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images

    before = run()
    pipe.load_lora_weights(str(out / "lora"))
    after = run()
    assert (after - before).abs().max() > 0.05
    assert _redness(after).mean() > _redness(before).mean()


# ----------------------------------------------------------------------------- resume
def test_resume_reproduces_the_uninterrupted_run(pipe_dirs, tmp_path):
    extra = dict(train__max_steps=6, train__gradient_accumulation_steps=2, train__checkpoint_every=2,
                 train__checkpoints_total_limit=2, train__ema_decay=0.9, optim__lr=5e-3, optim__lr_scheduler="cosine",
                 optim__warmup_steps=2, model__scheduler="ddpm",  # DDPM: stochastic scheduler steps too
                 reward="{test-red: 1.0, test-bright: 0.5}")  # composite: running statistics are state  # fmt: skip
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(load_method_config("refl", None, _overrides(pipe_dirs["sd15"], full, **extra)))
    cfg = load_method_config("refl", None, _overrides(pipe_dirs["sd15"], parts, **extra))
    stopped = train(cfg, stop_after_steps=3)
    assert stopped.step == 3 and stopped.weights_dir is None
    assert [p.name for p in list_checkpoints(parts / "checkpoints")] == ["checkpoint-000002", "checkpoint-000003"]
    resumed = train(cfg, resume="latest")
    assert resumed.step == 6
    a, b = _metrics(full), _metrics(parts)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward_mean", "lr", "grad_norm"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b], dtype=torch.float64),
                                   torch.tensor([m[key] for m in a], dtype=torch.float64), rtol=1e-5, atol=1e-9)  # fmt: skip
    final_a = load_file(full / "lora" / "pytorch_lora_weights.safetensors")
    final_b = load_file(parts / "lora" / "pytorch_lora_weights.safetensors")
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-5, atol=1e-7)


def test_refl_with_alternating_pretraining_steps(pipe_dirs, image_folder, tmp_path):
    out = tmp_path / "pretrain"
    overrides = _overrides(pipe_dirs["sd15"], out, train__max_steps=2, refl__pretrain_weight=1.0,
                           refl__pretrain_alternate="true", data__pretrain_images=str(image_folder))  # fmt: skip
    result = train(load_method_config("refl", None, overrides))
    first, second = _metrics(out)
    assert "reward_mean" in first and "pretrain_loss" not in first  # a ReFL step
    assert "pretrain_loss" in second and "reward_mean" not in second and second["grad_norm"] > 0  # a pre-training step
    assert result.weights_dir is not None


def test_per_step_noise_differs_by_process_and_step_and_repeats_exactly():
    def first(seed, step, rank):
        return torch.randn(4, generator=step_generators(seed, step, rank, "latents", 1)[0])

    assert torch.equal(first(0, 5, 0), first(0, 5, 0))
    assert not torch.equal(first(0, 5, 0), first(0, 5, 1))
    assert not torch.equal(first(0, 5, 0), first(0, 6, 0))


# ----------------------------------------------------------------------------- stability guard
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_the_checkpoint_intact(pipe_dirs, tmp_path):
    NanAfterReward.calls = 0
    out = tmp_path / "nan"
    overrides = _overrides(pipe_dirs["sd15"], out, reward="test-nan-after", train__max_steps=10,
                           train__checkpoint_every=2, train__max_nonfinite_steps=2)  # fmt: skip
    cfg = load_method_config("refl", None, overrides)
    with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row.*checkpoint-000002"):
        train(cfg)
    metrics = _metrics(out)
    assert [m["skipped"] for m in metrics] == [0.0, 0.0, 1.0, 1.0]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-000002"]
    state = json.loads((out / "checkpoints" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["nonfinite_in_a_row"] == 0


# ----------------------------------------------------------------------------- config & CLI
def test_config_overrides_types_and_errors():
    nested = parse_overrides(["optim.lr=1e-4", "refl.window=[30,39]", "reward={a: 1, b: 0.5}"])
    assert nested == {"optim": {"lr": "1e-4"}, "refl": {"window": [30, 39]}, "reward": {"a": 1, "b": 0.5}}
    cfg = load_config(rb.RewardBackpropConfig, None, ["pipeline=p", "reward=r", "optim.lr=1e-4"], method="draft")
    assert cfg.optim.lr == 1e-4 and cfg.method == "draft"
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(rb.RewardBackpropConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(rb.RewardBackpropConfig, None, ["train.max_steps=ten"])
    with pytest.raises(ValueError, match="refl.window"):
        load_method_config("refl", None, ["pipeline=p", "reward=r", "sampling.num_steps=10"])


def test_train_cli_prints_config_and_reports_bad_input_in_one_line(tmp_path, capsys):
    recipe = ROOT / "recipes" / "sd15_hpsv2_refl.yaml"
    assert main(["train", "refl", "--config", str(recipe), "--print-config", "optim.lr=2e-5"]) == 0
    assert "lr: 2.0e-05" in capsys.readouterr().out
    assert main(["train", "draft", "--config", str(recipe), "--print-config"]) == 2  # recipe says refl
    assert "recipe says method" in capsys.readouterr().err
    assert main(["train", "refl", "--config", str(recipe), "optim.bogus=1"]) == 2


# ----------------------------------------------------------------------------- multi-process
@pytest.mark.slow
def test_two_process_cpu_accelerate_launch(pipe_dirs, tmp_path):
    """Two CPU processes under ``accelerate launch`` (gloo): both end with the same weights, having drawn different noise.

    The launched script wraps the registered method's setup to keep, per process, its initial
    latents and its final trainable weights.
    """
    script = tmp_path / "launch_train.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        import test_train_reward_backprop  # registers the tiny rewards
        from imgalign.cli import main
        from imgalign.train import get_method, register_method

        method, kept = get_method("refl"), {{}}

        def setup(run):
            trainee = method.setup(run)
            prepare = trainee.adapter.prepare_latents
            def recorded(*args, **kwargs):
                latents = prepare(*args, **kwargs)
                kept.setdefault("latents", latents.detach().clone())
                return latents
            trainee.adapter.prepare_latents = recorded
            kept["trainee"], kept["rank"] = trainee, run.process_index
            return trainee

        register_method(dataclasses.replace(method, setup=setup), overwrite=True)
        code = main(sys.argv[1:])
        state = {{n: p.detach().contiguous() for n, p in kept["trainee"].trainable.items()}}
        save_file({{**state, "first_latents": kept["latents"].contiguous()}}, sys.argv[-1].split("=", 1)[1] + f"/rank-{{kept['rank']}}.safetensors")
        sys.exit(code)
    """))
    out = tmp_path / "ddp"
    args = ["train", "refl", *_overrides(pipe_dirs["sd15"], out, train__max_steps=2, train__batch_size=1,
                                         train__checkpoint_every=2), f"output_dir={out}"]  # fmt: skip
    proc = launch_two_cpu_processes(script, args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2]  # one writer (the main process)
    assert all(m["reward_std"] > 0 for m in metrics)  # gathered over processes
    assert (out / "checkpoints" / "checkpoint-000002" / "rng-1.json").is_file()  # every process saved its RNG
    rank0, rank1 = load_file(out / "rank-0.safetensors"), load_file(out / "rank-1.safetensors")
    assert not torch.equal(rank0.pop("first_latents"), rank1.pop("first_latents"))  # each process drew its own noise
    assert rank0.keys() == rank1.keys() and any("lora_" in k for k in rank0)
    for key in rank0:  # averaged gradients: the same update on both processes
        assert torch.equal(rank0[key], rank1[key]), key
    trained = [k for k in rank0 if "lora_B" in k]
    assert any(rank0[k].abs().sum() > 0 for k in trained)  # LoRA B starts at zero: it trained
