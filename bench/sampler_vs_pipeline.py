"""Figure 1: our adapter's sampling loop vs the diffusers pipeline call.

Same model, same steps, same seed, same precomputed prompt embeddings (so text encoders are
out of the measurement and full-size models need no tokenizer); both decode to a tensor.
Goal: time ratio ours/pipeline <= 1.02, equal peak memory.

    python bench/sampler_vs_pipeline.py                 # CPU: tiny architectures
    python bench/sampler_vs_pipeline.py --size full     # GPU: published sizes, random weights, bf16
"""

from __future__ import annotations

import argparse
import gc

import torch

from common import interleaved, machine_info, print_table, write_json  # noqa: I001

import pipelines
from pipelines.architectures import build_pipeline, random_prompt_embeds

# (family, resolution at full size, steps, guidance): published defaults of each model.
CASES = {
    "sd15": (512, 20, 7.5),
    "sdxl": (1024, 20, 5.0),
    "sd3": (1024, 20, 4.5),
    "flux": (1024, 10, 3.5),
}


def measure(family: str, size: str, device: str, dtype: torch.dtype, repeats: int, batch: int) -> dict:
    resolution, steps, guidance = CASES[family]
    if size == "tiny":
        resolution, steps = 64, 10
    pipe = build_pipeline(family, size, dtype=dtype, device=device, seed=0)
    pipe.set_progress_bar_config(disable=True)
    adapter = pipelines.load(pipe)
    embeds = random_prompt_embeds(family, pipe, batch, seed=0)
    common = dict(height=resolution, width=resolution, guidance_scale=guidance)

    def gens():
        return [torch.Generator("cpu").manual_seed(i) for i in range(batch)]

    def run_pipeline():
        return pipe(num_inference_steps=steps, generator=gens(), output_type="pt", **common, **embeds).images

    def run_adapter():
        return adapter.sample(None, num_steps=steps, generator=gens(), **common, **embeds)

    with torch.no_grad():
        same = (run_pipeline().float() - run_adapter().float()).abs().max().item()
        result = interleaved({"pipeline": run_pipeline, "adapter": run_adapter}, repeats, device)
    del pipe, adapter
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    pipe_t, ours_t = result["pipeline"]["median_s"], result["adapter"]["median_s"]
    return {
        "family": family, "size": size, "resolution": resolution, "steps": steps, "batch": batch,
        "pipeline_s": pipe_t, "adapter_s": ours_t, "time_ratio": ours_t / pipe_t,
        "pipeline_peak_gib": result["pipeline"]["peak_gib"], "adapter_peak_gib": result["adapter"]["peak_gib"],
        "max_abs_diff": same,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--families", nargs="*", default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(machine_info())
    rows = [measure(f, args.size, device, dtype, args.repeats, args.batch) for f in args.families]
    print_table(rows, ["family", "size", "resolution", "steps", "pipeline_s", "adapter_s", "time_ratio",
                       "pipeline_peak_gib", "adapter_peak_gib", "max_abs_diff"])  # fmt: skip
    path = write_json("sampler_vs_pipeline", rows, vars(args) | {"device": device, "dtype": str(dtype)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
