"""``imgalign demo``: the main job, on a CPU with nothing downloaded.

Evaluates the shipped Shapes text-to-image model on held-out prompts and seeds (colour/shape
pairs never seen in training) with the exact oracle and the learned Shapes rewards, aligns
it (default: best-of-8 under the learned per-object verifier; ``--algo draft`` and the other
reward-gradient methods train a LoRA on the same reward), evaluates again and prints the
paired gains with bootstrap intervals. ``--algo compare`` runs every available
text-to-image method at the same budget; ``--algo edit-refl`` aligns the Shapes edit model
with the learned edit reward. See :mod:`imgalign.shapes.demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Run the CPU demo: align the Shapes model with a learned reward, judged by the exact oracle."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..shapes.algorithms import DEFAULT_ALGORITHM, algorithm_names

    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --out")
    parser.add_argument("--algo", default=DEFAULT_ALGORITHM,
                        help=f"alignment method (default {DEFAULT_ALGORITHM}): {', '.join(algorithm_names())}")
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts to evaluate (default 48)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="seeds per prompt (default 2)")
    parser.add_argument("--sample-steps", type=int, default=10, help="sampling steps, training and evaluation (default 10)")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default: the method's)")
    parser.add_argument("--seed", type=int, default=1000, help="held-out seeds start here (default 1000)")
    parser.add_argument("--reward", default=None,
                        help="the reward the method optimises or selects by (default: shapes-verifier; "
                             "e.g. shapes-preference, shapes-clip-contrast, or a trained reward's directory)")


def run(args: argparse.Namespace) -> int:
    from ..shapes.demo import check_algorithm, run_demo
    from . import CommandError, prepare_out

    if args.algo != "compare":
        try:
            check_algorithm(args.algo)
        except ValueError as err:
            raise CommandError(str(err)) from None
    for option, value, least in (("--num-prompts", args.num_prompts, 2), ("--images-per-prompt", args.images_per_prompt, 1),
                                 ("--sample-steps", args.sample_steps, 2)):  # fmt: skip
        if value < least:
            raise CommandError(f"{option} must be >= {least}, got {value}")
    if args.train_steps is not None and args.train_steps < 1:
        raise CommandError(f"--train-steps must be >= 1, got {args.train_steps}")
    prepare_out(args, demo_outputs(), resumable=False)  # a used --out only with --overwrite
    report = run_demo(args.out, algo=args.algo, num_prompts=args.num_prompts, images_per_prompt=args.images_per_prompt,
                      sample_steps=args.sample_steps, train_steps=args.train_steps, seed=args.seed,
                      reward=args.reward)  # fmt: skip
    print()
    print((args.out / "report.md").read_text())
    pictures = ", ".join(sorted(p.name for p in args.out.glob("*.png")))
    print(f"finished in {report['seconds']:.0f} s; wrote report.json, report.md, {pictures} to {args.out}")
    return 0


def demo_outputs() -> tuple[str, ...]:
    """What a demo run writes into --out (what --overwrite removes): reports, pictures, one directory per method."""
    from ..shapes.demo import ALGORITHMS, EDIT_ALGORITHM

    return ("report.json", "report.md", "*.png", "real_images", "edit_sources", *ALGORITHMS, EDIT_ALGORITHM.name)
