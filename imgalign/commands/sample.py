"""``imgalign sample``: generate images through a pipeline adapter.

Seeding convention: image ``i`` of a run (counting over all prompts and repeats) starts from
``torch.Generator("cpu").manual_seed(seed + i)``, so image 0 with seed S is what
``pipe(..., generator=torch.Generator("cpu").manual_seed(S))`` returns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import CommandError

HELP = "Generate images with a diffusers pipeline (PNG files, samples.jsonl, grid.png)."
# imgalign.sampling.SAMPLERS, spelled out so that parsing arguments does not import torch.
SAMPLER_CHOICES = ["ode", "combined", "aig", "best-of-n"]

# Names come from pipelines.register and installed packages' "imgalign.pipelines" entry points.
PIPELINE_HELP = "pipeline directory, hub id, or registered name ('shapes', 'shapes-edit' = the shipped Shapes models)"

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help=PIPELINE_HELP)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="one prompt")
    text.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--instruction", help="edit instruction (edit pipelines; same as --prompt)")
    parser.add_argument("--image", type=Path, help="source image for edit pipelines")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4, help="images generated together (default 4)")
    parser.add_argument("--lora", type=Path, help="a diffusers-format LoRA directory to load")
    parser.add_argument("--sampler", default="ode", choices=SAMPLER_CHOICES,
                        help="ode: the pipeline's own loop; combined: base model for the first --switch-step "
                             "steps, then the LoRA; aig: s*base + (1-s)*tuned with s = 1-(i/T)^p (needs --lora); "
                             "best-of-n: the best of --best-of samples under --sampler-reward")
    parser.add_argument("--switch-step", type=int, default=None,
                        help="combined: steps run by the base model (default: 3/4 of --steps, ImageReFL's 30/40)")
    parser.add_argument("--aig-power", type=float, default=1.0, help="aig: the power p (default 1)")
    add_best_of_n_arguments(parser)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "flash", "math"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def add_best_of_n_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--best-of", type=int, default=4, help="best-of-n: candidates per image (default 4)")
    parser.add_argument("--sampler-reward", default=None, help="best-of-n: the reward that picks (a name or directory)")


def sampler_options(args: argparse.Namespace) -> dict:
    """Checks the sampler flags; returns best-of-n's keywords for ``run_sampler`` (empty otherwise)."""
    if args.sampler in ("combined", "aig") and args.lora is None:
        raise CommandError(f"--sampler {args.sampler} mixes the base model and a LoRA: give --lora DIR")
    if args.sampler != "best-of-n":
        return {}
    if args.sampler_reward is None:
        raise CommandError("--sampler best-of-n needs --sampler-reward NAME (the reward that picks the best)")
    if args.best_of < 1:
        raise CommandError(f"--best-of must be >= 1, got {args.best_of}")
    import rewards

    return {"reward": rewards.load(args.sampler_reward), "n": args.best_of}


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The run's prompts from --prompt / --instruction / --prompts (blank lines skipped)."""
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise CommandError(f"prompt file not found: {args.prompts}")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CommandError(f"prompt file is empty: {args.prompts}")
        return prompts
    text = args.prompt if args.prompt is not None else args.instruction
    if text is None:
        raise CommandError("give --prompt TEXT, --prompts FILE or (for edit pipelines) --instruction TEXT")
    return [text]


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import pipelines

    from ..images import load_image, save_grid, save_png
    from ..sampling import run_sampler

    prompts = read_prompts(args)
    if args.num_images < 1 or args.steps < 1 or args.batch_size < 1:
        raise CommandError("--num-images, --steps and --batch-size must be positive")
    best_of_n = sampler_options(args)
    switch_step = args.switch_step if args.switch_step is not None else (3 * args.steps) // 4
    if args.sampler == "combined" and not 0 <= switch_step <= args.steps:
        raise CommandError(f"--switch-step must be in [0, --steps={args.steps}], got {switch_step}")
    if args.sampler == "aig" and args.aig_power < 0:
        raise CommandError("--aig-power must be >= 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype])
    adapter = pipelines.load(args.pipeline, dtype=dtype, device=device, attention=args.attention)
    if args.lora is not None:
        pipelines.load_lora(adapter, args.lora)
    source = None
    if adapter.is_edit:
        if args.image is None:
            raise CommandError(f"{adapter.family} is an edit pipeline: give --image SRC and --instruction TEXT")
        source = load_image(args.image)
    elif args.image is not None:
        raise CommandError(f"--image is only for edit pipelines; {adapter.family} is text-to-image")
    height, width = args.height, args.width
    if source is not None:
        height, width = height or source.shape[-2], width or source.shape[-1]
    height, width = adapter.check_size(height, width)  # fail fast, before any model call

    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_images))]
    args.out.mkdir(parents=True, exist_ok=True)
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
    records, images = [], []
    with (args.out / "samples.jsonl").open("w") as log, tqdm(total=len(jobs), desc="sampling", unit="img") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            extra = {}
            if source is not None:
                extra["image"] = source.expand(len(batch), -1, -1, -1).to(device)
            common = dict(num_steps=args.steps, height=height, width=width, generator=generators, **guidance, **extra)
            out = run_sampler(args.sampler, adapter, [p for p, _ in batch], switch_step=switch_step,
                              aig_power=args.aig_power, **best_of_n, **common)  # fmt: skip
            for k, ((prompt, seed), image) in enumerate(zip(batch, out.cpu(), strict=True)):
                name = f"{start + k:04d}.png"
                save_png(image, args.out / name)
                record = {"file": name, "prompt": prompt, "seed": seed, "steps": args.steps,
                          "guidance": args.guidance, "height": height, "width": width,
                          "pipeline": str(args.pipeline), "lora": str(args.lora) if args.lora else None,
                          "sampler": args.sampler}  # fmt: skip
                if args.sampler == "combined":
                    record["switch_step"] = switch_step
                elif args.sampler == "aig":
                    record["aig_power"] = args.aig_power
                elif args.sampler == "best-of-n":
                    record.update(best_of=args.best_of, sampler_reward=args.sampler_reward)
                log.write(json.dumps(record) + "\n")
                records.append(record)
                images.append(image)
            bar.update(len(batch))
    save_grid(images, args.out / "grid.png")
    print(f"wrote {len(records)} images, samples.jsonl and grid.png to {args.out}")
    return 0
