"""``imgalign shapes build|verify``: regenerate the shipped Shapes models, or check them.

    imgalign shapes build                       # every model, into the package's weights
    imgalign shapes build --out runs/shapes --only t2i,clip --device cuda
    imgalign shapes verify                      # sha256 of the shipped files against the manifest

See :mod:`imgalign.shapes.build` for the stages and what each one measures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import CommandError

HELP = "Build the Shapes models from a seed (imgalign shapes build), or verify the shipped ones."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..shapes.build import STAGES
    from ..shapes.manifest import WEIGHTS_DIR

    parser.add_argument("action", choices=["build", "verify"])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR,
                        help="weights directory (default: the package's own, replacing the shipped models)")
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages (default all: {','.join(STAGES)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the build runs, not usable weights")


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        from ..shapes.manifest import verify

        if not (args.out / "manifest.json").is_file():
            raise CommandError(f"no manifest.json in {args.out}")
        bad = {model: files for model, files in verify(args.out).items() if files}
        for model, files in bad.items():
            print(f"{model}: {len(files)} file(s) differ from the manifest: {', '.join(files)}")
        if not bad:
            print(f"all files in {args.out} match manifest.json")
        return 1 if bad else 0
    from ..shapes.build import build

    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    command = "imgalign shapes " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["shapes"] else None
    try:
        build(args.out, stages=stages, seed=args.seed, device=args.device, quick=args.quick, command=command)
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(f"built {', '.join(stages)} into {args.out} (manifest: {args.out / 'manifest.json'})")
    return 0
