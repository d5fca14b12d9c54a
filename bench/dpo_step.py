"""Figure: one Diffusion-DPO step with the LoRA-disabled network as reference vs a second, frozen copy.

Diffusion-DPO needs the reference model's denoising errors on the winner and the loser. Our
trainer (``imgalign.train.preference.dpo_step``, like diffusers' LoRA DPO example) gets them
from the same network with the LoRA bypassed (``pipelines.lora_disabled``), so no second copy
of the denoiser is held. The baseline is the released Diffusion-DPO ``train.py``
(SalesforceAIResearch/DiffusionDPO), which loads the denoiser a second time as a frozen
``ref_unet``; here that copy is a ``copy.deepcopy`` of the base denoiser taken before LoRA is
added, frozen, on the same device. Both variants run the same step at the same batch:

    policy forward (LoRA on, with grad) on winners + losers, one batch of 2B
    reference forward under no_grad on the same noisy latents
    per_sample_error -> imgalign.losses.preference.diffusion_dpo_loss -> backward
    AdamW step on the LoRA parameters (rank 8, the default attention projections)

Inputs are synthetic: random clean latents for winners and losers, one noise shared by each
pair, random text embeddings (no text encoder); the step index is the middle of a 1000-step
schedule (cost does not depend on it). Models are the published architectures with random
weights: ``tiny`` and ``full`` come from ``pipelines.architectures`` (as in the other
figures); ``small`` (SD1.5 only) is the SD1.5 UNet's block structure (4 levels, 2 layers per
block, 8 heads, 768-wide cross-attention) at a fifth of its width, 37.5M parameters, at 256²,
so a CPU runs the whole figure in about two minutes (two busy cores).

Time: median seconds per step, the two variants interleaved in one process after warm-up
(bench/common.py). That process holds both the LoRA network and the copy, which does not
change compute but would blur memory, so memory is measured separately, each variant in a
fresh subprocess that builds only what that variant needs:

* CUDA: ``torch.cuda.max_memory_allocated`` over the warm-up and measured steps, after
  ``reset_peak_memory_stats`` (weights, copy, LoRA, AdamW state, activations; not the CUDA
  context or allocator slack); ``resident`` is ``memory_allocated`` after setup.
* CPU: the process's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``, a high-water
  mark the kernel keeps) minus its value just before the model is built, so the interpreter,
  torch and the imports are not counted. A high-water mark can only grow, which is why each
  variant needs its own process; it is exact (no sampling thread can miss a short peak) and
  covers build, warm-up and steps. ``resident`` is the current RSS after setup over the same
  baseline.

Both variants keep the VAE resident (the trainer does; it is not run here), so the memory
ratio is that of denoiser(s) + VAE + LoRA + AdamW + activations. Ratios are ours / baseline,
i.e. lora_disabled / frozen_copy. Goal on a GPU: memory <= 0.6x at time <= 1.05x. Before any
update, the two references are compared on the same input (``ref_max_abs_diff``: the
disabled adapter must be the base model). ``ref_switch_ms`` is the host time of entering and
leaving the reference alone, measured after the steps: ``lora_disabled`` walks the denoiser's
modules twice per step (diffusers' ``disable_adapters`` / ``enable_adapters``), a fixed cost
that a fast GPU step does not hide; ``frozen_copy`` only swaps a pipeline attribute.

    python bench/dpo_step.py                                  # CPU: SD1.5 "small" at 256^2, fp32
    python bench/dpo_step.py --size full --family sd15        # GPU: SD1.5 at 512^2, bf16
    python bench/dpo_step.py --size full --family sdxl        # GPU: SDXL at 1024^2, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common import ROOT, interleaved, machine_info, print_table, write_json  # noqa: I001

import pipelines
from imgalign.losses.preference import diffusion_dpo_loss, per_sample_error
from imgalign.train.forward_process import noise_to_step, target_at_step
from pipelines.architectures import SD15_UNET, build_pipeline, count_parameters, random_prompt_embeds

VARIANTS = ("frozen_copy", "lora_disabled")  # baseline first
RESOLUTION = {"tiny": {"sd15": 64, "sdxl": 64, "sd3": 64}, "small": {"sd15": 256},
              "full": {"sd15": 512, "sdxl": 1024, "sd3": 1024}}  # fmt: skip
# SD1.5's UNet at a fifth of its width (block structure, heads and cross-attention width kept).
SMALL_SD15_UNET = {**SD15_UNET, "block_out_channels": [64, 128, 256, 256], "sample_size": 32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_TIMESTEPS, LORA_RANK, BETA, LR = 1000, 8, 5000.0, 1e-5


# ============================================================================ model and inputs
def build_adapter(family: str, size: str, device: str, dtype: torch.dtype) -> pipelines.DiffusionAdapter:
    if size == "small":
        import diffusers

        pipe = build_pipeline("sd15", "tiny", text_encoders=False, seed=0)  # tiny VAE, no text encoders
        torch.manual_seed(0)
        pipe.unet = diffusers.UNet2DConditionModel.from_config({k: v for k, v in SMALL_SD15_UNET.items()
                                                                if not k.startswith("_")})  # fmt: skip
        for module in (pipe.unet, pipe.vae):
            torch.nn.Module.to(module, device=device, dtype=dtype)
    else:
        pipe = build_pipeline(family, size, dtype=dtype, device=device, seed=0, text_encoders=False)
    return pipelines.load(pipe)


@contextlib.contextmanager
def denoiser_swapped(adapter: pipelines.DiffusionAdapter, module: torch.nn.Module) -> Iterator[None]:
    """Run ``module`` (the frozen copy) through the adapter's own ``predict`` (same input scaling)."""
    policy = adapter.denoiser
    adapter.denoiser = module
    try:
        yield
    finally:
        adapter.denoiser = policy


class Setup:
    """One model with LoRA, optionally a frozen copy of its base, the optimizer and a fixed batch of pairs."""

    def __init__(self, args: argparse.Namespace, device: str, dtype: torch.dtype, with_copy: bool) -> None:
        self.adapter = adapter = build_adapter(args.family, args.size, device, dtype)
        denoiser = pipelines.unwrap_model(adapter.denoiser)
        self.denoiser_params = count_parameters(denoiser)
        self.copy = None
        if with_copy:  # DiffusionDPO's ref_unet: the base weights a second time, frozen, same device
            self.copy = copy.deepcopy(denoiser).requires_grad_(False).eval()
        params = pipelines.add_lora(adapter, rank=LORA_RANK)
        self.lora_params = sum(p.numel() for p in params)
        denoiser.train()
        if args.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(params, lr=LR)
        self.n = n = args.batch
        res = RESOLUTION[args.size][args.family]
        self.schedule = adapter.schedule(NUM_TIMESTEPS, height=res, width=res)
        self.i = NUM_TIMESTEPS // 2
        g = torch.Generator("cpu").manual_seed(0)
        channels = adapter.vae.config.latent_channels
        shape = (n, channels, res // adapter.vae_scale_factor, res // adapter.vae_scale_factor)
        x0 = torch.randn((2 * n, *shape[1:]), generator=g).to(device, dtype)  # winners then losers
        noise = torch.randn(shape, generator=g).repeat(2, 1, 1, 1).to(device, dtype)  # shared within a pair
        self.x = noise_to_step(adapter, self.schedule, self.i, x0, noise)
        self.target = target_at_step(adapter, self.schedule, self.i, x0, noise)
        embeds = random_prompt_embeds(args.family, adapter.pipe, n, seed=0)
        embeds = {k: torch.cat([v, v]) for k, v in embeds.items() if not k.startswith("negative_")}
        with torch.no_grad():  # the trainer's conditioning for DPO: conditional branch only, no CFG
            self.cond = adapter.encode_prompt(None, guidance_scale=1.0, **embeds)

    def reference(self, variant: str) -> contextlib.AbstractContextManager:
        if variant == "lora_disabled":
            return pipelines.lora_disabled(self.adapter)
        return denoiser_swapped(self.adapter, self.copy)

    def reference_errors(self, variant: str) -> torch.Tensor:
        with torch.no_grad(), self.reference(variant):
            return per_sample_error(self.adapter.predict(self.x, self.schedule, self.i, self.cond), self.target)

    def step(self, variant: str) -> None:
        """SCORE / LOSS / UPDATE of ``imgalign.train.preference.dpo_step`` on the fixed pairs."""
        n = self.n
        policy = per_sample_error(self.adapter.predict(self.x, self.schedule, self.i, self.cond), self.target)
        reference = self.reference_errors(variant)
        out = diffusion_dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=BETA)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()


def switch_cost_ms(s: Setup, variant: str, repeats: int = 20) -> float:
    """Host time of entering and leaving the reference alone (no forward): the per-step price of the switch."""
    start = time.perf_counter()
    for _ in range(repeats):
        with s.reference(variant):
            pass
    return (time.perf_counter() - start) / repeats * 1e3


# ============================================================================ memory probe (subprocess)
def rss_bytes() -> int | None:
    """Current resident set size (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def probe(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    """Build one variant in this (fresh) process, run warm-up + a few steps, report resident and peak bytes."""
    variant = args.probe
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = max_rss_bytes()
    s = Setup(args, device, dtype, with_copy=variant == "frozen_copy")
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    else:
        now = rss_bytes()
        resident = None if now is None else now - base
    for _ in range(args.warmup + args.memory_steps):
        s.step(variant)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max_rss_bytes() - base
    return {"variant": variant, "resident_bytes": resident, "peak_bytes": peak}


def measure_memory(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", variant, "--family", args.family,
           "--size", args.size, "--batch", str(args.batch), "--warmup", str(args.warmup),
           "--memory-steps", str(args.memory_steps), "--device", args.device, "--dtype", args.dtype]  # fmt: skip
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode or not lines:
        raise RuntimeError(f"memory probe for {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("PROBE "):])


# ============================================================================ main
def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "sd3"], default="sd15")
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="full" if cuda else "small")
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step (2x images per forward)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each variant (median); 10 GPU, 5 CPU")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps after warm-up in each memory probe")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 is steadier on a shared, busy CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the policy's UNet blocks")
    parser.add_argument("--json", default=None, help="where to write the JSON (default bench/out/dpo_step.json)")
    parser.add_argument("--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.family not in RESOLUTION[args.size]:
        parser.error(f"--size {args.size} is defined for {', '.join(RESOLUTION[args.size])} only")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.steps = args.steps or (10 if args.device.startswith("cuda") else 5)
    device, dtype = args.device, DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print("PROBE " + json.dumps(probe(args, device, dtype)), flush=True)
        return

    print(machine_info())
    memory = {v: measure_memory(args, v) for v in VARIANTS}  # before this process allocates anything
    s = Setup(args, device, dtype, with_copy=True)
    ref_diff = (s.reference_errors("lora_disabled") - s.reference_errors("frozen_copy")).abs().max().item()
    fns: dict[str, Callable[[], None]] = {v: functools.partial(s.step, v) for v in VARIANTS}
    timing = interleaved(fns, args.steps, device, warmup=args.warmup)
    switch_ms = {v: switch_cost_ms(s, v) for v in VARIANTS}

    gib = 2**30
    base_t, base_peak = timing["frozen_copy"]["median_s"], memory["frozen_copy"]["peak_bytes"]
    rows = []
    for v in VARIANTS:
        m, t = memory[v], timing[v]
        rows.append({
            "variant": v, "family": args.family, "size": args.size, "batch_pairs": args.batch,
            "step_s": t["median_s"], "min_s": t["min_s"], "time_ratio": t["median_s"] / base_t,
            "resident_gib": None if m["resident_bytes"] is None else m["resident_bytes"] / gib,
            "peak_gib": m["peak_bytes"] / gib, "mem_ratio": m["peak_bytes"] / base_peak,
            "ref_switch_ms": switch_ms[v], "ref_max_abs_diff": ref_diff,
        })  # fmt: skip
    shown = [r | {"ref_max_abs_diff": f"{r['ref_max_abs_diff']:.1e}"} for r in rows]
    print_table(shown, ["variant", "family", "size", "batch_pairs", "step_s", "time_ratio", "resident_gib", "peak_gib",
                       "mem_ratio", "ref_switch_ms", "ref_max_abs_diff"])  # fmt: skip
    settings = vars(args) | {
        "resolution": RESOLUTION[args.size][args.family], "num_timesteps": NUM_TIMESTEPS, "timestep_index": s.i,
        "lora_rank": LORA_RANK, "beta": BETA, "lr": LR, "denoiser_params": s.denoiser_params,
        "lora_params": s.lora_params,
        "memory_method": "cuda max_memory_allocated (fresh process per variant)" if device.startswith("cuda")
        else "peak RSS (getrusage ru_maxrss) over the pre-build value, fresh process per variant",
    }  # fmt: skip
    if args.json:
        path = Path(args.json).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"figure": "dpo_step", "machine": machine_info(), "settings": settings, "rows": rows}
        path.write_text(json.dumps(payload, indent=2))
    else:
        path = write_json("dpo_step", rows, settings)
    print(f"wrote {path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path}")
    del s
    gc.collect()


if __name__ == "__main__":
    main()
