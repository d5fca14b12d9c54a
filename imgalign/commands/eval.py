"""``imgalign eval``: generate K images per prompt with fixed seeds and score them with rewards.

Writes ``report.json`` (per reward: mean and bootstrap 95% interval over prompts; the
oracle's per-attribute accuracy; within-prompt diversity), ``report.md`` and ``grid.png``.
Two runs with the same seed give the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import CommandError
from .sample import (
    PIPELINE_HELP,
    SAMPLER_CHOICES,
    add_best_of_n_arguments,
    add_lora_arguments,
    check_values,
    lora_choice,
    sampler_options,
)

HELP = "Evaluate a generator: K images per prompt, scored by rewards, with bootstrap intervals."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help=PIPELINE_HELP)
    add_lora_arguments(parser)
    parser.add_argument("--sampler", default="ode", choices=SAMPLER_CHOICES)
    parser.add_argument("--switch-step", type=int, default=None, help="combined: steps run by the base model")
    parser.add_argument("--aig-power", type=float, default=1.0)
    add_best_of_n_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    prompts.add_argument("--prompt-set", help="a named prompt set: shapes-heldout, shapes-train")
    parser.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--reward", required=True, help="reward names, comma separated (e.g. shapes-oracle,shapes-clip)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="image j of prompt p uses seed + p*K + j")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)


def prompt_list(args: argparse.Namespace) -> list[str]:
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise CommandError(f"prompt file not found: {args.prompts}")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    else:
        from imgalign.prompt_sets import PROMPT_SETS, prompt_set

        if args.prompt_set not in PROMPT_SETS:
            raise CommandError(f"unknown prompt set {args.prompt_set!r}; known: {', '.join(PROMPT_SETS)}")
        prompts = prompt_set(args.prompt_set)
    prompts = prompts[: args.num_prompts] if args.num_prompts is not None else prompts
    if not prompts:
        raise CommandError("no prompts to evaluate")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    import pipelines
    import rewards

    from ..evaluation import evaluate, markdown_table
    from ..images import save_grid
    from ..sampling import plan_segments, run_sampler

    check_values(args, {"--num-prompts": args.num_prompts, "--images-per-prompt": args.images_per_prompt,
                        "--steps": args.steps, "--batch-size": args.batch_size})  # fmt: skip
    prompts = prompt_list(args)
    best_of_n = sampler_options(args)
    loras = lora_choice(args)
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    scorers = {name: rewards.load(name) for name in names}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = pipelines.load(args.pipeline, dtype=torch.float32, device=device)
    loras.load(adapter)
    height, width = adapter.check_size(args.height, args.width)
    segment_record = {}
    if loras.routing is not None:  # also checks --skip against the schedule before any model call
        plan = plan_segments(adapter, loras.routing, args.steps, skip=loras.skip, height=height, width=width)
        segment_record = {"function_evaluations": plan.function_evaluations, "steps_per_segment": plan.steps_per_segment}
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}

    def sample(batch_prompts, generators):
        return run_sampler(
            args.sampler, adapter, batch_prompts, switch_step=args.switch_step, aig_power=args.aig_power,
            routing=loras.routing, skip=loras.skip, num_steps=args.steps, height=height, width=width,
            generator=generators, **best_of_n, **guidance,
        )  # fmt: skip

    result = evaluate(sample, prompts, scorers, images_per_prompt=args.images_per_prompt, seed=args.seed,
                      batch_size=args.batch_size)  # fmt: skip
    summary = result.summary()
    summary["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run"}
    summary["settings"].update(loras.record(), **segment_record)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(summary, indent=2))
    table = markdown_table(summary)
    (args.out / "report.md").write_text(table + "\n")
    save_grid(result.images[: min(64, len(result.images))], args.out / "grid.png", ncols=args.images_per_prompt if args.images_per_prompt > 1 else None)
    print(table)
    print(f"wrote report.json, report.md and grid.png to {args.out}")
    return 0
