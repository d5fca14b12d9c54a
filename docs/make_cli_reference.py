"""Write docs/cli.md, the command-line reference, from the argparse definitions themselves.

    python docs/make_cli_reference.py            # rewrite docs/cli.md
    python docs/make_cli_reference.py --check    # exit 1 if docs/cli.md differs (what the tests run)

Every subcommand of ``imgalign`` gets its one-line help, its usage, a table of its arguments
(read from the parser's actions, so option names, choices and defaults cannot drift) and one
worked example from :data:`EXAMPLES`. A command without an example is an error: a new
subcommand fails the check until it has one. Run in a fresh process (the tests do), so that
methods or rewards registered by other code do not leak into the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "cli.md"

#: One worked example per command. The Shapes ones run offline on a CPU (tests/test_readme.py
#: runs the README's copies); each one parses against the current parser (tests/test_docs.py).
EXAMPLES: dict[str, tuple[str, str]] = {
    "sample": ("Four images from the shipped Shapes model, with their prompt and seed in `samples.jsonl`.",
               'imgalign sample --pipeline shapes --prompt "a picture of a large red circle on the left on a white '
               'background" --num-images 4 --steps 20 --guidance 3 --out runs/samples'),
    "score": ("Score those images with the oracle and ShapesCLIP, each with its own prompt.",
              "imgalign score --reward shapes-oracle,shapes-clip --images runs/samples --out runs/samples-scores.jsonl"),
    "eval": ("Best-of-8 under the learned verifier on 48 held-out prompts x 2 seeds, judged by the oracle.",
             "imgalign eval --pipeline shapes --prompt-set shapes-heldout-eval --num-prompts 48 --images-per-prompt 2 "
             "--seed 1000 --steps 10 --guidance 3 --sampler best-of-n --best-of 8 --sampler-reward shapes-verifier "
             "--reward shapes-oracle,shapes-verifier --out runs/eval-best-of-8"),
    "demo": ("Evaluate, align and evaluate again, with paired bootstrap intervals (about 3 minutes on 2 CPU cores).",
             "imgalign demo --algo best-of-n --out runs/demo"),
    "train": ("Diffusion-DPO on on-policy pairs of the Shapes model; `key=value` overrides any recipe key.",
              "imgalign train dpo --config recipes/shapes_verifier_dpo.yaml train.max_steps=10"),
    "train-reward": ("Train a reward head on preference pairs (the recipe's header says how to make the pairs).",
                     "imgalign train-reward --config recipes/reward.yaml"),
    "eval-reward": ("Pairwise accuracy, accuracy with ties and a reliability plot of a trained reward.",
                    "imgalign eval-reward --reward runs/reward/reward --data runs/shapes-pairs/val/pairs.jsonl "
                    "--out runs/eval-reward"),
    "filter": ("Keep the best quarter of each prompt's images under a reward.",
               "imgalign filter --data items.jsonl --reward shapes-oracle --top-fraction 0.25 --per prompt "
               "--out runs/curated"),
    "serve-reward": ("Serve a reward to training processes in other environments (`reward=remote:http://...`).",
                     "imgalign serve-reward --reward shapes-verifier --port 8000"),
    "shapes": ("Check the shipped Shapes weights against their manifest.", "imgalign shapes verify"),
}


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value is argparse.SUPPRESS or action.nargs == 0 or action.required:
        return ""
    if isinstance(value, Path) or (isinstance(value, str) and value.startswith(str(ROOT))):
        value = Path(value)
        value = value.relative_to(ROOT) if value.is_absolute() and value.is_relative_to(ROOT) else value
    return f"`{value}`" if value != "" else '`""`'


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and not action.option_strings and action.metavar:
        return f"{action.metavar}: " + ", ".join(f"`{c}`" for c in action.choices)
    if action.choices is not None:
        return ", ".join(f"`{c}`" for c in action.choices)
    return f"`{action.metavar or action.dest.upper()}`".replace("|", "\\|")


def _cell(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text.replace("|", "\\|").replace("%%", "%")


def command_section(name: str, parser: argparse.ArgumentParser, help_text: str) -> list[str]:
    lines = [f"## `imgalign {name}`", "", _cell(help_text), "", "```", parser.format_usage().strip(), "```", "",
             "| argument | value | default | |", "|---|---|---|---|"]  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        required = " (required)" if action.required and action.option_strings else ""
        lines.append(f"| {names}{required} | {_value(action)} | {_default(action)} | {_cell(action.help)} |")
    what, command = EXAMPLES[name]
    lines += ["", f"Example: {what}", "", "```bash", command, "```", ""]
    return lines


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal: fix the width
    sys.path.insert(0, str(ROOT))
    from imgalign.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    missing = [name for name in sub.choices if name not in EXAMPLES]
    if missing:
        raise SystemExit(f"no worked example for: {', '.join(missing)} (add one to EXAMPLES in {Path(__file__).name})")
    lines = ["# Command-line reference", "",
             "<!-- Generated by docs/make_cli_reference.py from the argparse definitions; do not edit by hand. "
             "tests/test_docs.py fails when this file and the parsers differ. -->", "",
             "`imgalign [--debug] COMMAND [options]`. Every command turns a user error into one line on stderr and "
             "exit status 2 (`--debug` or `IMGALIGN_DEBUG=1` shows the traceback); a non-empty `--out` needs "
             "`--resume` or `--overwrite`.", ""]  # fmt: skip
    lines += [f"- [`{name}`](#imgalign-{name}): {_cell(helps[name])}" for name in sub.choices] + [""]
    for name, command in sub.choices.items():
        lines += command_section(name, command, helps[name])
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run python docs/make_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
