"""``imgalign filter``: score a dataset with a reward and keep the best items.

    imgalign filter --data items.jsonl --reward hpsv2.1 --top-fraction 0.25 --per prompt --out runs/curated
    accelerate launch --num_processes 2 -m imgalign.cli filter --data edits.jsonl --reward editreward \\
        --threshold 0.5 --out runs/edits-kept

Items are text-to-image records (image + prompt) or edit triples (source image +
instruction + edited image). Rerunning the same command with ``--resume`` after a crash
continues where it stopped; a non-empty ``--out`` needs ``--resume`` or ``--overwrite``. A reward
served by another process (``--reward remote:http://host:port``, see ``imgalign serve-reward``)
that stops answering stops the run the same way, with nothing lost. A run
in which no item could be scored exits with status 2. See :mod:`imgalign.curation` for the
outputs.
"""

from __future__ import annotations

import argparse

from imgalign.commands import CommandError, add_output_arguments, blame, one_line, prepare_out, resolve_device

HELP = "Score a dataset with a reward (or composite) and keep the top fraction or a threshold."
#: What filter writes into --out (what --overwrite removes); see imgalign.curation.
OUTPUTS = ("parts", "run.json", "scores.jsonl", "kept", "kept.jsonl", "kept.parquet", "summary.json", "histogram.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                        help="dataset: .jsonl, .parquet (pyarrow) or a datasets directory (datasets)")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="reward name(s) and weights (hpsv2.1, hpsv2.1=1,clip=0.5) or a reward.json / trained reward dir")
    parser.add_argument("--checkpoint", default=None, metavar="PATH", help="checkpoint for a single named reward")
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--top-fraction", type=float, default=None, metavar="F", help="keep the best F (0 < F <= 1)")
    keep.add_argument("--threshold", type=float, default=None, metavar="T", help="keep items scoring >= T")
    parser.add_argument("--per", choices=("global", "prompt"), default="global",
                        help="rank all items together, or within each prompt (top fraction only)")
    parser.add_argument("--image-key", default=None, help="record field of the (edited) image (default: auto)")
    parser.add_argument("--prompt-key", default=None, help="record field of the prompt / instruction (default: auto)")
    parser.add_argument("--source-key", default=None, help="record field of the source image of an edit (default: auto)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--bins", type=int, default=30, metavar="N", help="histogram bins")
    parser.add_argument("--device", "--reward-device", dest="device", default=None,
                        help="the reward's device: cpu, cuda ... (default: the process's accelerate device)")
    parser.add_argument("--out", required=True, metavar="DIR")
    add_output_arguments(parser)


def _load_reward(spec: str, checkpoint: str | None):
    import rewards

    try:
        if spec.endswith(".json") or "/" in spec or spec.startswith("."):
            members = {spec: 1.0}
        else:
            members = rewards.parse_spec(spec)
    except ValueError as err:
        raise CommandError(f"--reward: {err}") from None
    if checkpoint is not None and len(members) != 1:
        raise CommandError("--checkpoint needs exactly one --reward")
    with blame(*(("--reward", spec) if checkpoint is None else ("--checkpoint", checkpoint))):
        if len(members) == 1:
            (name, weight), = members.items()
            reward = rewards.load(name, **({"checkpoint": checkpoint} if checkpoint else {}))
            # a one-member composite gives the same record shape (components + total) as several
            return rewards.CompositeReward({name: (reward, weight)}, normalize="none")
        return rewards.load(members)


def run(args) -> int:
    import math

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bins < 1:
        raise CommandError(f"--bins must be >= 1, got {args.bins}")
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise CommandError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise CommandError(f"--threshold must be a finite number, got {args.threshold}")
    if args.per == "prompt" and args.threshold is not None:
        raise CommandError("--per prompt applies to --top-fraction; a threshold is the same for every prompt")

    import torch
    from accelerate import PartialState

    import rewards
    from imgalign.curation import UNREACHABLE, FilterSpec, run_filter

    try:
        rewards.data.dataset_format(args.data)
    except rewards.data.DatasetFormatError as err:
        raise CommandError(f"--data: {err}") from None
    prepare_out(args, OUTPUTS, clear=False)  # every process checks (read-only) before anything loads
    if args.device is not None:
        resolve_device(args.device)
    state = PartialState(cpu=args.device == "cpu")
    if args.overwrite and state.is_main_process:
        from imgalign.outputs import clear_outputs

        clear_outputs(args.out, OUTPUTS)
    state.wait_for_everyone()
    device = torch.device(args.device) if args.device else state.device
    reward = _load_reward(args.reward, args.checkpoint).to(device).eval()
    spec = FilterSpec(data=args.data, out=args.out, reward=args.reward, checkpoint=args.checkpoint,
                      top_fraction=args.top_fraction, threshold=args.threshold, per=args.per,
                      image_key=args.image_key, prompt_key=args.prompt_key, source_key=args.source_key,
                      batch_size=args.batch_size, bins=args.bins)
    try:
        summary = run_filter(spec, reward, state if state.num_processes > 1 else None)
    except UNREACHABLE as err:
        raise CommandError(f"{one_line(err)} -- every item scored so far is saved in {args.out}: rerun the same "
                           "command with --resume once the reward is reachable") from None  # fmt: skip
    if summary is not None:
        print(f"kept {summary['kept']} of {summary['items']} item(s) ({summary['errors']} error(s)) -> "
              f"{summary['kept_dataset']}; scores in {args.out}/scores.jsonl, histogram {args.out}/histogram.png")
        if summary["scored"] == 0:
            raise CommandError(f"--data {args.data}: none of the {summary['items']} item(s) could be scored; "
                               f"the reason of each is in {args.out}/scores.jsonl")  # fmt: skip
    return 0
