"""``imgalign demo``: the main job, on a CPU with nothing downloaded.

Evaluates the shipped Shapes text-to-image model on held-out prompts and seeds (colour/shape
pairs never seen in training) with the exact oracle: per-attribute accuracy, exact-match
rate with a bootstrap interval, within-prompt diversity, a grid of samples. Alignment of
the model (``--algo``) comes with the learned Shapes rewards; methods not available yet
say so in one line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Run the CPU demo: the Shapes model judged by the oracle (alignment methods as they land)."

PLANNED_ALGOS = ("refl", "draft", "imagerefl", "dpo", "tpo", "grpo", "smart-grpo", "best-of-n", "noise-search",
                 "speculative", "combined", "edit-refl", "compare")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--algo", default=None, help=f"alignment method: {', '.join(PLANNED_ALGOS)}")
    parser.add_argument("--num-prompts", type=int, default=48, help="held-out prompts to evaluate (default 48)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000, help="held-out seeds start here")


def run(args: argparse.Namespace) -> int:
    import torch

    import pipelines
    import rewards

    from ..evaluation import evaluate, markdown_table
    from ..images import save_grid
    from ..shapes import prompt_set
    from ..shapes.manifest import WEIGHTS_DIR
    from . import CommandError

    if args.algo is not None:
        if args.algo not in PLANNED_ALGOS:
            raise CommandError(f"unknown --algo {args.algo!r}; choose one of {', '.join(PLANNED_ALGOS)}")
        raise CommandError(f"--algo {args.algo}: not available yet in the demo (it needs the learned Shapes rewards)")
    torch.manual_seed(0)
    adapter = pipelines.load(str(WEIGHTS_DIR / "t2i"), dtype=torch.float32, device="cpu")
    prompts = prompt_set("heldout")[: args.num_prompts]
    oracle = rewards.load("shapes-oracle")

    def sample(batch_prompts, generators):
        return adapter.sample(batch_prompts, num_steps=args.steps, guidance_scale=3.0, generator=generators)

    print(f"Shapes text-to-image model, {len(prompts)} held-out prompts x {args.images_per_prompt} seeds, judged by the oracle")
    result = evaluate(sample, prompts, {"shapes-oracle": oracle}, images_per_prompt=args.images_per_prompt, seed=args.seed)
    summary = result.summary()
    exact = result.details["shapes-oracle/attributes"]["exact_rate"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))
    save_grid(result.images[:48], args.out / "base_grid.png", ncols=8)
    print(markdown_table(summary))
    print(f"\nexact-match rate {100 * exact:.1f}%: the room alignment has to work with")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'base_grid.png'}")
    return 0
