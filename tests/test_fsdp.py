"""Scale-out on CPU (2 processes, gloo): FSDP2 full fine-tuning, exact resume under FSDP, DDP-equal averaging, launch configs.

One ``accelerate launch`` (``recipes/accelerate/cpu_2proc.yaml``) runs, in each of two processes:

* a full fine-tuning run of a tiny SD1.5 UNet under ``train.distributed=fsdp`` (global batch 2);
* the same run stopped after 2 of 3 steps and resumed (``--stop-after-steps``, ``--resume latest``);
* one update of a small model through :class:`~imgalign.train.loop.GradientStep` (the hand-written
  all-reduce of the data-parallel path) and through ``DistributedDataParallel``.

The toy method draws its noise for the *global* batch and keeps its own process's slice, so
that 1 process with batch 2 sees exactly what 2 processes with batch 1 see together.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CPU_2PROC_CONFIG, launch_two_cpu_processes
from imgalign.train import Method, register_method
from imgalign.train.config import FsdpConfig, LoopConfig, PipelineTrainingConfig, load_config
from imgalign.train.loop import step_generators
from imgalign.train.pipeline import setup_pipeline
from imgalign.train.run import StepLoss, train
from imgalign.train.sharding import check_launch_config, sharding_units

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]
STEPS = 2


# ----------------------------------------------------------------------------- a toy full fine-tuning method
@dataclass
class ToySection:
    target: float = 0.3


@dataclass
class FsdpToyConfig(PipelineTrainingConfig):
    method: str = "fsdp-toy"
    toy: ToySection = field(default_factory=ToySection)


def fsdp_toy_step(trainee, micro):
    """Three denoiser calls (one without gradient), noise drawn for the global batch and sliced per process."""
    adapter, cfg = trainee.adapter, trainee.cfg
    b, processes = cfg.train.batch_size, trainee.data.sampler.num_processes
    batch = trainee.data.batch(micro.index, micro.process_index)
    cond = trainee.encode(batch.prompts, None, guidance=False)
    schedule = adapter.schedule(4, height=trainee.height, width=trainee.width)
    generators = step_generators(micro.seed, micro.index, 0, "global-latents", b * processes)
    mine = generators[micro.process_index * b : (micro.process_index + 1) * b]
    x = adapter.prepare_latents(b, trainee.height, trainee.width, generator=mine)
    with torch.no_grad():
        x1 = adapter.step(adapter.predict(x, schedule, 0, cond), schedule, 0, x)
    first = adapter.predict(x, schedule, 0, cond)
    second = adapter.predict(x1, schedule, 1, cond)
    loss = ((first - cfg.toy.target) ** 2).mean() + 0.5 * (second**2).mean()
    return StepLoss(loss)


FSDP_TOY = Method("fsdp-toy", FsdpToyConfig, setup=lambda run: setup_pipeline(run, needs_reward=False), step=fsdp_toy_step,
                  help="a toy full fine-tuning loss (tests/test_fsdp.py)")  # fmt: skip
register_method(FSDP_TOY, overwrite=True)


def toy_overrides(pipe: str, out: Path, **extra) -> list[str]:
    base = {
        "pipeline": pipe, "output_dir": str(out), "data.prompts": json.dumps(PROMPTS), "lora.enabled": "false",
        "sampling.height": SIZE, "sampling.width": SIZE, "sampling.num_steps": 2, "validation.num_images": 1,
        "train.max_steps": STEPS, "train.checkpoint_every": 0, "train.report_to": "[]", "train.ema_decay": 0.5,
        "train.gradient_checkpointing": "true", "optim.lr": 0.2, "optim.lr_scheduler": "linear", "optim.eps": 1.0,
    }  # fmt: skip
    # AdamW with eps=1 updates by about lr * gradient: the weights then compare the averaged
    # gradients, where a small eps would compare Adam's sign-like first steps on gradient
    # entries that are rounding noise.
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _unet(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


# ----------------------------------------------------------------------------- the 2-process launch
LAUNCHED = """
import json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
import test_fsdp  # registers the toy method
torch.set_num_threads(1)
from imgalign.train import get_method, register_method
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from pathlib import Path

pipe, out = sys.argv[1], Path(sys.argv[2])
method, kept = get_method("fsdp-toy"), {{}}

def setup(run):
    trainee = method.setup(run)
    kept["trainee"], kept["rank"] = trainee, run.process_index
    return trainee

import dataclasses
register_method(dataclasses.replace(method, setup=setup), overwrite=True)
# Three runs share this launch (a preempted job would be launched again): train() ends with
# accelerate's end_training(), which would take the process group down with it.
from accelerate.state import PartialState
PartialState.destroy_process_group = lambda self, group=None: None
overrides = lambda name, **kw: test_fsdp.toy_overrides(pipe, out / name, train__batch_size=1, train__distributed="fsdp", **kw)
train(load_method_config("fsdp-toy", None, overrides("full")))
from torch.distributed.tensor import DTensor
weight = next(iter(kept["trainee"].trainable.values()))
shards = {{"dtensor": isinstance(weight, DTensor), "local": weight.to_local().numel() if isinstance(weight, DTensor) else -1,
           "full": weight.numel(), "class": type(kept["trainee"].trainable_module()).__name__}}
cfg = load_method_config("fsdp-toy", None, overrides("parts", train__checkpoint_every=1, validation__num_images=0))
train(cfg, stop_after_steps=1)
train(cfg, resume="latest")
averaging = test_fsdp.gradient_step_and_ddp_updates()
(out / f"rank-{{kept['rank']}}.json").write_text(json.dumps({{"shards": shards, "averaging": averaging}}))
"""


def gradient_step_and_ddp_updates() -> dict[str, float]:
    """One SGD step of the same model on each process's own batch: GradientStep's all-reduce vs DDP's; the largest difference."""
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    from imgalign.train.loop import GradientStep

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    reference.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(4 + 2 * rank, 5, generator=g), torch.randn(4 + 2 * rank, 3, generator=g)

    params = list(ours.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ((ours(x) - y) ** 2).mean().backward()
    outcome = GradientStep(accelerator, params, optimizer, schedule, max_grad_norm=None)()

    ddp = DistributedDataParallel(reference)
    ddp_optimizer = torch.optim.SGD(ddp.parameters(), lr=1.0)
    ((ddp(x) - y) ** 2).mean().backward()
    ddp_optimizer.step()
    differences = [float((a - b).abs().max()) for a, b in zip(ours.parameters(), reference.parameters(), strict=True)]
    return {"max_difference": max(differences), "applied": float(outcome.applied),
            "first_weight": ours[0].weight.flatten()[:4].tolist()}  # fmt: skip


@pytest.fixture(scope="module")
def two_process_run(sd15_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "launched.py"
    script.write_text(textwrap.dedent(LAUNCHED.format(root=str(ROOT), tests=str(Path(__file__).parent))))
    proc = launch_two_cpu_processes(script, [sd15_dir, str(out)], timeout=900)  # generous: shared, loaded CI machines
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


# ----------------------------------------------------------------------------- tests
def test_fsdp_on_two_processes_equals_one_process_with_the_same_global_batch(two_process_run, sd15_dir, tmp_path):
    out, ranks = two_process_run
    for rank in ranks:  # every process held half of each weight, in the model's own class
        shards = rank["shards"]
        assert shards["dtensor"] and shards["local"] < shards["full"] and shards["class"] == "FSDPUNet2DConditionModel"
    single = tmp_path / "single"
    train(load_config(FsdpToyConfig, None, toy_overrides(sd15_dir, single, train__batch_size=2, train__checkpoint_every=STEPS)))
    a, b = _metrics(single), _metrics(out / "full")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b if key in m], dtype=torch.float64),
                                   torch.tensor([m[key] for m in a if key in m], dtype=torch.float64), rtol=1e-5, atol=1e-8)  # fmt: skip
    _assert_same_weights(_unet(single), _unet(out / "full"))  # the exported diffusers pipeline, EMA weights
    initial = load_file(Path(sd15_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max(float((initial[k] - w).abs().max()) for k, w in _unet(single).items()) > 1e-3  # it trained
    # the exported pipeline is an ordinary diffusers directory (its own class names, no FSDP wrapper)
    index = json.loads((out / "full" / "pipeline" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet_config = json.loads((out / "full" / "pipeline" / "unet" / "config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DConditionModel"
    # checkpoints: the same names and layout as a single-process run's
    ckpt_a, ckpt_b = (run / "checkpoints" / f"checkpoint-{STEPS:06d}" for run in (single, out / "parts"))
    assert load_file(ckpt_a / "trainable.safetensors").keys() == load_file(ckpt_b / "trainable.safetensors").keys()
    assert load_file(ckpt_a / "optimizer.safetensors").keys() == load_file(ckpt_b / "optimizer.safetensors").keys()


def test_a_stopped_and_resumed_fsdp_run_equals_the_uninterrupted_one(two_process_run):
    out, _ = two_process_run
    a, b = _metrics(out / "full"), _metrics(out / "parts")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([m[key] for m in b if key in m], dtype=torch.float64),
                                   torch.tensor([m[key] for m in a if key in m], dtype=torch.float64), rtol=1e-5, atol=1e-9)  # fmt: skip
    _assert_same_weights(_unet(out / "full"), _unet(out / "parts"))
    assert (out / "parts" / "checkpoints" / "checkpoint-000001" / "rng-1.json").is_file()


def test_data_parallel_gradient_averaging_equals_ddp(two_process_run):
    _, ranks = two_process_run
    for rank in ranks:
        assert rank["averaging"]["applied"] == 1.0
        assert rank["averaging"]["max_difference"] < 1e-6
    assert ranks[0]["averaging"]["first_weight"] == ranks[1]["averaging"]["first_weight"]


# ----------------------------------------------------------------------------- configuration
ACCELERATE_CONFIGS = ["single_gpu", "ddp_8gpu", "fsdp_8gpu", "fsdp_2node", "cpu_2proc"]


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_launch_configs_parse_as_accelerate_configs(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    assert str(path) == CPU_2PROC_CONFIG or name != "cpu_2proc"
    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are an error there
    assert isinstance(config, ClusterConfig)
    assert config.num_processes == raw["num_processes"] and config.num_machines == raw["num_machines"]
    assert str(config.distributed_type).split(".")[-1] in ("NO", "MULTI_GPU", "FSDP")
    if "fsdp" in name:
        assert config.fsdp_config["fsdp_version"] == 2
        env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
               "FSDP_RESHARD_AFTER_FORWARD": str(config.fsdp_config["fsdp_reshard_after_forward"]).lower(),
               "FSDP_OFFLOAD_PARAMS": str(config.fsdp_config["fsdp_offload_params"]).lower(),
               "FSDP_ACTIVATION_CHECKPOINTING": str(config.fsdp_config["fsdp_activation_checkpointing"]).lower()}  # fmt: skip
        check_launch_config(LoopConfig(distributed="fsdp"), env)  # agrees with the run's defaults
        with pytest.raises(ValueError, match="train.distributed=fsdp"):
            check_launch_config(LoopConfig(), env)
        with pytest.raises(ValueError, match="train.fsdp.cpu_offload"):
            check_launch_config(LoopConfig(distributed="fsdp", fsdp=FsdpConfig(cpu_offload=True)), env)


def test_fsdp_refuses_fp16_and_lora_and_shards_the_block_lists(tmp_path):
    with pytest.raises(ValueError, match="bf16"):
        check_launch_config(LoopConfig(distributed="fsdp", mixed_precision="fp16"), {})
    lora = toy_overrides("unused", tmp_path / "lora", lora__enabled="true", train__distributed="fsdp")
    with pytest.raises(ValueError, match="lora.enabled=false"):
        train(load_config(FsdpToyConfig, None, lora))
    from pipelines.architectures import build_pipeline

    unet = build_pipeline("sd15", "tiny", seed=0).unet
    assert len(sharding_units(unet)) == len(unet.down_blocks) + len(unet.up_blocks) + 1
    sd3 = build_pipeline("sd3", "tiny", seed=0).transformer
    assert sharding_units(sd3) == list(sd3.transformer_blocks)
    flux = build_pipeline("flux", "tiny", seed=0).transformer
    assert sharding_units(flux) == [*flux.transformer_blocks, *flux.single_transformer_blocks]


def test_optimizer_state_is_stored_by_name_and_older_positional_checkpoints_still_load(tmp_path):
    from imgalign.train.checkpoint import CheckpointManager, TrainerState

    def parts(seed: int):
        torch.manual_seed(seed)
        params = {"a.weight": torch.nn.Parameter(torch.randn(3, 2)), "b.bias": torch.nn.Parameter(torch.randn(4))}
        optimizer = torch.optim.AdamW(params.values(), lr=0.1, betas=(0.8, 0.9))
        return {"trainable": params, "optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)}  # fmt: skip

    saved = parts(0)
    sum((p**2).sum() for p in saved["trainable"].values()).backward()
    saved["optimizer"].step()
    path = CheckpointManager(tmp_path).save(TrainerState(step=1), **saved)
    stored = load_file(path / "optimizer.safetensors")
    assert set(stored) == {f"{n}/{k}" for n in ("a.weight", "b.bias") for k in ("step", "exp_avg", "exp_avg_sq")}
    expected = saved["optimizer"].state_dict()
    for layout in ("by-name", "positional"):
        if layout == "positional":  # a checkpoint written before the state moved to safetensors
            (path / "optimizer.safetensors").unlink()
            (path / "optimizer.json").unlink()
            torch.save(expected, path / "optimizer.pt")
        loaded = parts(1)
        CheckpointManager(tmp_path).load(path, **loaded)
        state = loaded["optimizer"].state_dict()
        assert state["param_groups"][0]["betas"] == (0.8, 0.9)
        for i in (0, 1):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state["state"][i][key], expected["state"][i][key]), (layout, key)
