"""``imgalign eval``: generate K images per prompt with fixed seeds and score them with rewards.

Writes every image (``0000.png``, ...) with its record in ``samples.jsonl`` (prompt, seed,
settings and its scores, written batch by batch, so ``--resume`` continues an interrupted
evaluation), ``report.json`` (per reward: mean and bootstrap 95% interval over prompts; the
oracle's per-attribute accuracy; within-prompt diversity of the saved 8-bit images),
``report.md`` and ``grid.png`` (captioned with prompts and scores). Two runs with the same
seed give the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import CommandError, add_output_arguments, blame, prepare_out, resolve_device
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
#: What eval writes into --out (what --overwrite removes); see imgalign.outputs.
OUTPUTS = ("[0-9][0-9][0-9][0-9]*.png", "samples.jsonl", "grid.png", "report.json", "report.md")


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
    parser.add_argument("--device", default=None, help="the generator's device (default: cuda if available)")
    parser.add_argument("--reward-device", default=None,
                        help="the rewards' device, e.g. cuda:1 beside the generator's (default: cpu, where rewards "
                             "load); a remote:http://... reward scores on its server")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: 0000.png ..., samples.jsonl (per-image scores), report.json, "
                             "report.md, grid.png")
    add_output_arguments(parser)


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
    from tqdm.auto import tqdm

    import pipelines
    import rewards

    from ..evaluation import markdown_table, result_from_records, score_images
    from ..images import from_uint8, load_image, save_grid, save_png, to_uint8
    from ..io import atomic_write_bytes
    from ..outputs import JsonlAppender, clear_outputs
    from ..sampling import plan_segments, run_sampler

    check_values(args, {"--num-prompts": args.num_prompts, "--images-per-prompt": args.images_per_prompt,
                        "--steps": args.steps, "--batch-size": args.batch_size})  # fmt: skip
    prompts = prompt_list(args)
    resuming = prepare_out(args, OUTPUTS, clear=False)  # refuse a used --out before anything loads
    best_of_n = sampler_options(args)
    loras = lora_choice(args)
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    if not names:
        raise CommandError("--reward needs at least one reward name (e.g. shapes-oracle)")
    reward_device = resolve_device(args.reward_device, "--reward-device") if args.reward_device else None
    scorers = {}
    for name in names:
        with blame("--reward", name):
            scorers[name] = rewards.load(name)
        if reward_device is not None:
            scorers[name] = scorers[name].to(reward_device)
    device = resolve_device(args.device)
    with blame("--pipeline", args.pipeline):
        adapter = pipelines.load(args.pipeline, dtype=torch.float32, device=device)
    with blame("--lora"):
        loras.load(adapter)
    with blame("--height/--width"):
        height, width = adapter.check_size(args.height, args.width)
    segment_record = {}
    if loras.routing is not None:  # also checks --skip against the schedule before any model call
        plan = plan_segments(adapter, loras.routing, args.steps, skip=loras.skip, height=height, width=width)
        segment_record = {"function_evaluations": plan.function_evaluations, "steps_per_segment": plan.steps_per_segment}
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}

    # One record per image, written (after its PNG) batch by batch: file, prompt, seed, the settings,
    # then its scores, so an interrupted evaluation is consistent and --resume scores nothing twice.
    k = args.images_per_prompt
    common = {"steps": args.steps, "guidance": args.guidance, "height": height, "width": width,
              "pipeline": str(args.pipeline), **loras.record(), "sampler": args.sampler, "rewards": names}  # fmt: skip
    if best_of_n:
        common.update(best_of=args.best_of, sampler_reward=args.sampler_reward,
                      **({"search": best_of_n["search"]} if "search" in best_of_n else {}))  # fmt: skip
    expected = [{"file": f"{i * k + j:04d}.png", "prompt": p, "prompt_index": i, "seed": args.seed + i * k + j, **common}
                for i, p in enumerate(prompts) for j in range(k)]  # fmt: skip
    done = _resumable(args.out, expected) if resuming else []
    if args.overwrite:
        clear_outputs(args.out, OUTPUTS)
    args.out.mkdir(parents=True, exist_ok=True)
    log = JsonlAppender(args.out / "samples.jsonl", done)
    records = list(done)
    saved = [load_image(args.out / r["file"])[0] for r in done]  # the 8-bit images, as a fresh run keeps them
    if done:
        print(f"resuming: {len(done)} of {len(expected)} image(s) already evaluated in {args.out}")
    # progress bars on a terminal only (disable=None), not in logs or tests
    with tqdm(total=len(expected), initial=len(done), desc="evaluating", unit="img", disable=None) as bar:
        for start in range(len(done), len(expected), args.batch_size):
            batch = expected[start : start + args.batch_size]
            generators = [torch.Generator("cpu").manual_seed(r["seed"]) for r in batch]
            texts = [r["prompt"] for r in batch]
            with torch.no_grad():
                out = run_sampler(args.sampler, adapter, texts, switch_step=args.switch_step, aig_power=args.aig_power,
                                  routing=loras.routing, skip=loras.skip, num_steps=args.steps, height=height,
                                  width=width, generator=generators, return_output=True, **best_of_n,
                                  **guidance)  # fmt: skip
            images = out.images.float().cpu()
            scores, details = score_images(scorers, images, texts, batch_size=args.batch_size)
            for n, (want, image) in enumerate(zip(batch, images, strict=True)):
                pixels = to_uint8(image)
                save_png(pixels, args.out / want["file"])  # atomic: complete, or absent
                record = {**want, "nfe": int(out.nfe[n]), "scores": {name: v[n] for name, v in scores.items()}}
                if details:
                    record["details"] = {name: rows[n] for name, rows in details.items()}
                log.add(record)
                records.append(record)
                saved.append(from_uint8(pixels))
            log.commit()  # after the batch's images
            bar.update(len(batch))

    result = result_from_records(prompts, k, records, torch.stack(saved), scorers)
    summary = result.summary()
    summary["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run"}
    summary["settings"].update(loras.record(), **segment_record)
    nfe = [r["nfe"] for r in records if r.get("nfe") is not None]
    summary["nfe_per_image"] = sum(nfe) / len(nfe) if nfe else None
    atomic_write_bytes(args.out / "report.json", json.dumps(summary, indent=2).encode())
    table = markdown_table(summary)
    atomic_write_bytes(args.out / "report.md", (table + "\n").encode())
    shown = min(64, len(records))
    save_grid(result.images[:shown], args.out / "grid.png", ncols=k if k > 1 else None,
              captions=[r["prompt"] for r in records[:shown]], scores=[r["scores"] for r in records[:shown]])  # fmt: skip
    print(table)
    print(f"wrote {len(records)} images, samples.jsonl (per-image scores), report.json, report.md and grid.png "
          f"to {args.out}")  # fmt: skip
    return 0


def _resumable(out: Path, expected: list[dict]) -> list[dict]:
    """The finished records of the interrupted evaluation in ``out`` (a changed option is a one-line error)."""
    from ..outputs import OutputExistsError, resumable_records

    try:
        return resumable_records(out, expected)
    except OutputExistsError as err:
        raise CommandError(str(err)) from None
