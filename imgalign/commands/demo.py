"""``imgalign demo``: the main job, on a CPU with nothing downloaded.

Until the Shapes world ships its trained models, the demo is a sampling smoke run: it builds
a tiny Stable Diffusion pipeline from the published architecture at reduced size (random
weights), saves it like any diffusers pipeline, and runs ``imgalign sample`` on it, checking
that the adapter reproduces the diffusers pipeline's own output for the same seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run the CPU demo (currently a sampling smoke run on a tiny pipeline)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--family", default="sd15", help="architecture family to build (default sd15)")
    parser.add_argument("--algo", default=None, help="alignment method (not available yet)")


def run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from pipelines.architectures import FAMILIES, build_pipeline

    from . import CommandError
    from .sample import add_arguments as sample_arguments
    from .sample import run as sample

    if args.algo is not None:
        raise CommandError(f"--algo {args.algo}: alignment methods are not available yet")
    if args.family not in FAMILIES or args.family in ("flux-kontext", "instruct-pix2pix"):
        raise CommandError(f"--family must be a text-to-image family: {', '.join(FAMILIES[:5])}")
    pipe_dir = args.out / "pipeline"
    build_pipeline(args.family, "tiny", seed=0).save_pretrained(pipe_dir)
    parser = argparse.ArgumentParser()
    sample_arguments(parser)
    sample_args = parser.parse_args([
        "--pipeline", str(pipe_dir), "--prompt", "a red circle on a white background", "--num-images", "4",
        "--steps", "8", "--height", "64", "--width", "64", "--seed", "0", "--device", "cpu",
        "--out", str(args.out / "samples"),
    ])  # fmt: skip
    sample(sample_args)

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        "a red circle on a white background", num_inference_steps=8, height=64, width=64,
        generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
    ).images[0]  # fmt: skip
    from imgalign.images import load_image

    ours = load_image(args.out / "samples" / "0000.png")[0]
    diff = (ours - reference).abs().max().item() * 255
    print(f"adapter vs diffusers pipeline, image 0: max difference {diff:.2f}/255 (PNG quantisation <= 0.5)")
    print(f"grid: {args.out / 'samples' / 'grid.png'}")
    return 0 if diff <= 1.0 else 1
