"""Figure: time and peak memory of one reward-backprop step (ReFL, DRaFT-K) vs a plain reference.

The reference is a ReFL step written the way ImageReward's ``ReFL.py`` writes it: batched
CFG UNet calls under ``no_grad`` up to the stop step, one UNet call with gradient, the
scheduler's ``pred_original_sample``, a plain VAE decode, the reward, backward; no
checkpointing of any kind. Ours is the trainer's own SAMPLE/SCORE/UPDATE code
(``imgalign.train.reward_backprop``) on the same model (LoRA rank 8 on the UNet attention),
batch, stop step and reward, with and without gradient checkpointing (UNet blocks) and
VAE-decode checkpointing; DRaFT-K with K = 1 and 4 (each denoiser call with gradient is
checkpointed when checkpointing is on).

The reward is the mean of the red channel (differentiable, negligible cost): the figure is
about the generator side of the step. Times are median seconds per step (forward +
backward), runs interleaved; ratios are against the reference in the same process.
On GPU, MFU counts UNet model FLOPs only (0.84 TFLOP per image forward at 512^2, backward
= 2x forward; recomputation is not useful work, VAE and text encoders are not counted)
against the device's bf16 dense peak (H100: 989 TFLOP/s).

    python bench/refl_step.py                # CPU: tiny SD1.5 at 32^2, 10 steps
    python bench/refl_step.py --size full    # GPU: SD1.5 at 512^2 (random weights, bf16), 40 steps
"""

from __future__ import annotations

import argparse
import gc

import torch

from common import interleaved, machine_info, print_table, write_json  # noqa: I001

import pipelines
from imgalign.train import reward_backprop as rb
from pipelines.architectures import build_pipeline, random_prompt_embeds

UNET_TFLOP_PER_IMAGE_512 = 0.84  # SD1.5 UNet forward at 512^2 (references.md, cost figures)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense


def red_reward(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].mean(dim=(1, 2))


def build(size: str, device: str, dtype: torch.dtype, batch: int, steps: int, resolution: int):
    pipe = build_pipeline("sd15", size, dtype=dtype, device=device, seed=0)
    adapter = pipelines.load(pipe)
    pipelines.add_lora(adapter, rank=8)
    pipelines.unwrap_model(adapter.denoiser).train()
    embeds = random_prompt_embeds("sd15", pipe, batch, seed=0)
    return pipe, adapter, embeds


def reference_refl_step(pipe, embeds, steps: int, stop: int, resolution: int, guidance: float, seed: int) -> None:
    """ImageReward ReFL.py-style step: plain calls, batched CFG, no checkpointing."""
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    batch = embeds["prompt_embeds"].shape[0]
    text = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, unet.config.in_channels, resolution // 8, resolution // 8)
    latents = torch.randn(shape, generator=g).to(unet.device, unet.dtype)
    scheduler.set_timesteps(steps, device=unet.device)
    timesteps = scheduler.timesteps
    with torch.no_grad():
        for t in timesteps[:stop]:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(model_in, t, encoder_hidden_states=text).sample.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    t = timesteps[stop]
    model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    uncond, cond = unet(model_in, t, encoder_hidden_states=text).sample.chunk(2)
    x0 = scheduler.step(uncond + guidance * (cond - uncond), t, latents).pred_original_sample
    image = vae.decode(x0 / vae.config.scaling_factor).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    loss = torch.relu(2 - red_reward(image)).mean() * 1e-3
    loss.backward()
    unet.zero_grad(set_to_none=True)


def ours_step(adapter, embeds, cfg: rb.RewardBackpropConfig, seed: int) -> None:
    """The trainer's SAMPLE / SCORE / UPDATE for one micro-batch."""
    batch = rb.Batch([""] * embeds["prompt_embeds"].shape[0])
    with torch.no_grad():
        cond = adapter.encode_prompt(None, guidance_scale=cfg.sampling.guidance_scale, **embeds)
    schedule = adapter.schedule(cfg.sampling.num_steps, height=cfg.sampling.height, width=cfg.sampling.width)
    ctx = rb.StepContext(adapter, cfg, cond, schedule, batch, seed_step=seed, process_index=0)
    sampled = rb.SAMPLERS[cfg.method](ctx)
    r = red_reward(sampled.images)
    loss, _ = rb.method_loss(cfg, r, sampled, None)
    loss.backward()
    adapter.denoiser.zero_grad(set_to_none=True)


def set_checkpointing(adapter, unet: bool, vae: bool) -> None:
    denoiser = pipelines.unwrap_model(adapter.denoiser)
    if unet:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    adapter.vae_checkpointing = vae


def flops_per_step(method: str, k: int, steps: int, stop: int, batch: int, resolution: int) -> float:
    """UNet model FLOPs of one step (CFG doubles every call; backward = 2x forward)."""
    forward = UNET_TFLOP_PER_IMAGE_512 * 1e12 * (resolution / 512) ** 2 * batch * 2
    if method == "refl":
        return forward * stop + 3 * forward
    return forward * (steps - k) + 3 * forward * k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    resolution, steps = (512, 40) if args.size == "full" else (32, 10)
    stop, guidance = steps - 1, 7.5  # the last window step: the most no-grad work, as in ReFL's [30, 39]
    print(machine_info())
    pipe, adapter, embeds = build(args.size, device, dtype, args.batch, steps, resolution)

    def config(method: str, **extra) -> rb.RewardBackpropConfig:
        overrides = ["pipeline=bench", "reward=bench", f"sampling.num_steps={steps}", f"sampling.height={resolution}",
                     f"sampling.width={resolution}", f"sampling.guidance_scale={guidance}",
                     f"refl.window=[{stop},{stop}]"] + [f"{k}={v}" for k, v in extra.items()]  # fmt: skip
        return rb.load_reward_backprop_config(None, overrides, method)

    cases = {  # name -> (method, K, unet checkpointing, vae checkpointing, config)
        "refl": ("refl", 1, False, False, config("refl")),
        "refl+gc": ("refl", 1, True, False, config("refl")),
        "refl+gc+vae": ("refl", 1, True, True, config("refl")),
        "draft-k1": ("draft", 1, False, False, config("draft", **{"draft.k": 1, "draft.checkpoint_steps": "false"})),
        "draft-k1+gc+vae": ("draft", 1, True, True, config("draft", **{"draft.k": 1})),
        "draft-k4": ("draft", 4, False, False, config("draft", **{"draft.k": 4, "draft.checkpoint_steps": "false"})),
        "draft-k4+gc+vae": ("draft", 4, True, True, config("draft", **{"draft.k": 4})),
    }

    def reference() -> None:
        set_checkpointing(adapter, False, False)
        reference_refl_step(pipe, embeds, steps, stop, resolution, guidance, seed=0)

    fns = {"reference": reference}
    for name, (_, _, gc_unet, gc_vae, cfg) in cases.items():
        def run(cfg=cfg, gc_unet=gc_unet, gc_vae=gc_vae) -> None:
            set_checkpointing(adapter, gc_unet, gc_vae)
            ours_step(adapter, embeds, cfg, seed=0)

        fns[name] = run
    result = interleaved(fns, args.repeats, device)
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in machine_info()["device"]), None)
    ref = result["reference"]
    rows = []
    for name in fns:
        method, k, gc_unet, gc_vae = ("refl", 1, False, False) if name == "reference" else cases[name][:4]
        t = result[name]["median_s"]
        flops = flops_per_step(method, k, steps, stop, args.batch, resolution)
        row = {
            "case": name, "method": method, "k": k if method == "draft" else None, "unet_ckpt": gc_unet,
            "vae_ckpt": gc_vae, "step_s": t, "time_ratio": t / ref["median_s"], "peak_gib": result[name]["peak_gib"],
            "mem_ratio": (result[name]["peak_gib"] / ref["peak_gib"]) if ref["peak_gib"] else None,
            "mfu": (flops / t / 1e12 / peak_tflops) if (peak_tflops and args.size == "full") else None,
        }  # fmt: skip
        rows.append(row)
    print_table(rows, ["case", "unet_ckpt", "vae_ckpt", "step_s", "time_ratio", "peak_gib", "mem_ratio", "mfu"])
    settings = vars(args) | {"device": device, "dtype": str(dtype), "resolution": resolution, "steps": steps,
                             "stop_step": stop, "guidance": guidance, "lora_rank": 8}  # fmt: skip
    path = write_json("refl_step", rows, settings)
    print(f"wrote {path}")
    del pipe, adapter
    gc.collect()


if __name__ == "__main__":
    main()
