"""Figure: what sharding costs and saves — 2 processes vs 1 at the same global batch (CPU), FSDP peak memory (GPU).

CPU (default): full fine-tuning of the tiny SD1.5 UNet through the run skeleton
(:func:`imgalign.train.run.train`, a plain denoising loss, global batch ``--global-batch``)
in three settings, each a fresh launch: 1 process (the baseline), 2 processes with plain
data parallelism (``train.distributed=ddp``), 2 processes with FSDP2 (``fsdp``); the 2-process
runs use ``recipes/accelerate/cpu_2proc.yaml`` (gloo). Per setting: median seconds per
optimizer step (steps after the first) and the largest peak RSS of its processes; ratios
against the 1-process run. Settings are interleaved over ``--repeats`` rounds. On a machine
with 2 cores the 2-process runs share the cores the 1-process run has to itself, so the
time ratio is mostly the cost of the second process and of the collectives, not a speed-up.

GPU (``--gpu``, when a GPU is lent): full fine-tuning peak memory per device of one training
step (forward, backward, AdamW step; bf16 compute, fp32 master weights, gradient
checkpointing) of SDXL-sized and SD3.5-medium-sized denoisers (published configs, random
weights): without FSDP on 1 device, with FSDP on every visible device, and with FSDP plus
CPU offload; the ratio is against the run without FSDP.

    python bench/fsdp_overhead.py                   # CPU: 1 vs 2 processes (ddp, fsdp)
    python bench/fsdp_overhead.py --gpu             # GPU: peak memory per device, SDXL and SD3.5-medium
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import ROOT, machine_info, print_table, write_json  # noqa: I001

CPU_2PROC = ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]


# ============================================================================ CPU worker: a run through the skeleton
def register_bench_method() -> None:
    """A plain denoising loss whose noise is drawn for the global batch (each process keeps its slice)."""
    from imgalign.train import Method, register_method
    from imgalign.train.config import PipelineTrainingConfig
    from imgalign.train.loop import step_generators
    from imgalign.train.pipeline import setup_pipeline
    from imgalign.train.run import StepLoss

    @dataclass
    class BenchConfig(PipelineTrainingConfig):
        method: str = "bench-denoise"

    def step(trainee, micro):
        adapter, b = trainee.adapter, trainee.cfg.train.batch_size
        processes = trainee.data.sampler.num_processes
        batch = trainee.data.batch(micro.index, micro.process_index)
        cond = trainee.encode(batch.prompts, None, guidance=False)
        schedule = adapter.schedule(4, height=trainee.height, width=trainee.width)
        generators = step_generators(micro.seed, micro.index, 0, "global-latents", b * processes)
        x = adapter.prepare_latents(b, trainee.height, trainee.width,
                                    generator=generators[micro.process_index * b : (micro.process_index + 1) * b])  # fmt: skip
        return StepLoss((adapter.predict(x, schedule, 1, cond) ** 2).mean())

    register_method(Method("bench-denoise", BenchConfig, setup=lambda run: setup_pipeline(run, needs_reward=False),
                           step=step), overwrite=True)  # fmt: skip


def cpu_worker(pipe: str, out: str, batch: int, steps: int, distributed: str) -> None:
    torch.set_num_threads(1)
    register_bench_method()
    from imgalign.train.registry import load_method_config
    from imgalign.train.run import train

    overrides = {"pipeline": pipe, "output_dir": out, "data.prompts": json.dumps(PROMPTS), "lora.enabled": "false",
                 "sampling.height": 32, "sampling.width": 32, "validation.num_images": 0, "train.max_steps": steps,
                 "train.batch_size": batch, "train.report_to": "[]", "train.distributed": distributed}  # fmt: skip
    train(load_method_config("bench-denoise", None, [f"{k}={v}" for k, v in overrides.items()]))
    rank = int(os.environ.get("RANK", "0"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    Path(out, f"rss-{rank}.json").write_text(json.dumps({"peak_rss_mib": peak_mib}))


def cpu_setting(pipe: str, processes: int, distributed: str, global_batch: int, steps: int) -> dict[str, float]:
    """One fresh launch; median step seconds (after the first step) and the largest per-process peak RSS."""
    out = tempfile.mkdtemp(prefix="fsdp-bench-")
    args = [str(Path(__file__).resolve()), "--worker", pipe, out, str(global_batch // processes), str(steps), distributed]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(CPU_2PROC), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes} process(es), {distributed}: {proc.stderr[-2000:]}")
    metrics = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    rss = [json.loads(p.read_text())["peak_rss_mib"] for p in Path(out).glob("rss-*.json")]
    return {"step_s": statistics.median(m["step_time_s"] for m in metrics[1:]), "peak_rss_mib": max(rss)}


def run_cpu(args: argparse.Namespace) -> None:
    from pipelines.architectures import build_pipeline

    pipe_dir = Path(tempfile.mkdtemp(prefix="fsdp-bench-pipe-")) / "sd15"
    build_pipeline("sd15", "tiny", seed=0).save_pretrained(pipe_dir)
    settings = [("1 process", 1, "ddp"), ("2 processes, ddp", 2, "ddp"), ("2 processes, fsdp", 2, "fsdp")]
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in settings}
    for _ in range(args.repeats):  # interleaved rounds
        for name, processes, distributed in settings:
            samples[name].append(cpu_setting(str(pipe_dir), processes, distributed, args.global_batch, args.steps))
    load_after = os.getloadavg()
    base = {k: statistics.median(s[k] for s in samples["1 process"]) for k in ("step_s", "peak_rss_mib")}
    rows = []
    for name, _, _ in settings:
        step_s = statistics.median(s["step_s"] for s in samples[name])
        rss = statistics.median(s["peak_rss_mib"] for s in samples[name])
        rows.append({"setting": name, "step_s": step_s, "time_ratio": step_s / base["step_s"], "peak_rss_mib": rss,
                     "rss_ratio": rss / base["peak_rss_mib"]})  # fmt: skip
    print(f"CPU, {os.cpu_count()} cores, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after")
    print_table(rows, ["setting", "step_s", "time_ratio", "peak_rss_mib", "rss_ratio"])
    write_json("fsdp_overhead_cpu", rows, {"global_batch": args.global_batch, "steps": args.steps,
                                           "repeats": args.repeats, "model": "sd15 tiny, 32x32, full fine-tuning",
                                           "load_average": [load_before[0], load_after[0]]})  # fmt: skip


# ============================================================================ GPU: peak memory per device
GPU_MODELS = {"sdxl": ("SDXL UNet", 1024), "sd3": ("SD3.5-medium-sized MMDiT", 1024)}


def gpu_worker(family: str, mode: str, resolution: int) -> None:
    """One full fine-tuning step's peak memory on this process's device (launched once per setting)."""
    import torch.distributed as dist

    import pipelines
    from imgalign.train.config import FsdpConfig, LoopConfig, LoraConfig
    from imgalign.train.loop import setup_trainable
    from imgalign.train.sharding import shard_trainable
    from pipelines.architectures import build_pipeline, random_prompt_embeds

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl", device_id=device)
    pipe = build_pipeline(family, "full", dtype=torch.bfloat16, device=device, seed=0)
    embeds = random_prompt_embeds(family, pipe, 1, seed=0)
    adapter = pipelines.load(pipe)
    trainable = setup_trainable(adapter, LoraConfig(enabled=False))  # the denoiser in fp32, all trainable
    adapter.enable_gradient_checkpointing()
    params = list(trainable.values())
    if mode != "plain":
        loop = LoopConfig(distributed="fsdp", mixed_precision="bf16", fsdp=FsdpConfig(cpu_offload=mode == "fsdp+offload"))
        sharded = shard_trainable(pipelines.unwrap_model(adapter.denoiser), trainable, loop, device)
        params = list(sharded.named_trainable().values())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    cond = adapter.encode_prompt(None, guidance_scale=1.0, **embeds)
    schedule = adapter.schedule(10, height=resolution, width=resolution)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(2):  # the second step holds the optimizer state as well
        g = torch.Generator("cpu").manual_seed(step)
        x = adapter.prepare_latents(1, resolution, resolution, generator=[g])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = adapter.predict(x, schedule, 5, cond).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    result = {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "two_steps_s": time.perf_counter() - start,
              "params_b": sum(p.numel() for p in trainable.values()) / 1e9}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


def run_gpu(args: argparse.Namespace) -> None:
    devices = torch.cuda.device_count()
    if devices == 0:
        raise SystemExit("--gpu: no CUDA device visible")
    rows = []
    for family, (name, resolution) in GPU_MODELS.items():
        base = None
        for mode, processes in (("plain", 1), ("fsdp", devices), ("fsdp+offload", devices)):
            worker = [str(Path(__file__).resolve()), "--gpu-worker", family, mode, str(resolution)]
            cmd = [sys.executable, *worker] if processes == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *worker]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                rows.append({"model": name, "setting": f"{mode} x{processes}", "error": proc.stderr.strip()[-300:]})
                continue
            peak = max(r["peak_gib"] for r in found)
            base = peak if mode == "plain" else base
            rows.append({"model": name, "params_b": found[0]["params_b"], "resolution": resolution,
                         "setting": f"{mode} x{processes}", "peak_gib_per_device": peak,
                         "ratio": peak / base if base else None})  # fmt: skip
    print_table(rows, ["model", "params_b", "resolution", "setting", "peak_gib_per_device", "ratio"])
    write_json("fsdp_overhead_gpu", rows, {"devices": devices, "machine": machine_info()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="peak memory per device on GPUs (SDXL, SD3.5-medium)")
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        pipe, out, batch, steps, distributed = args.worker
        cpu_worker(pipe, out, int(batch), int(steps), distributed)
    elif args.gpu_worker:
        family, mode, resolution = args.gpu_worker
        gpu_worker(family, mode, int(resolution))
    elif args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
