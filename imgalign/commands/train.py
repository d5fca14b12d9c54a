"""``imgalign train METHOD --config RECIPE [key=value ...]``: run a registered training method.

    imgalign train refl --config recipes/sd15_hpsv2_refl.yaml output_dir=runs/refl optim.lr=2e-5
    imgalign train refl --config recipes/sd15_hpsv2_refl.yaml output_dir=runs/refl --resume latest
    accelerate launch --num_processes 2 -m imgalign.cli train draft --config recipes/sdxl_pickscore_draft_lv.yaml

Overrides use dotted keys and YAML values (``refl.window=[30,39]``, ``reward={hpsv2.1: 1, clip: 0.5}``).
The methods are the registry's (:mod:`imgalign.train.registry`); ``imgalign train --help``
lists them.
"""

from __future__ import annotations

import argparse
import re

from ..cli import OneLineArgumentParser
from . import CommandError

HELP = "Train with a registered method (reward backprop, preference optimisation, reward models; --help lists them)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.registry import available_methods

    methods = available_methods()
    parser.add_argument("method", choices=list(methods), metavar="METHOD",
                        help="; ".join(f"{k}: {v}" for k, v in methods.items()))  # fmt: skip
    add_run_arguments(parser)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every training command shares (``train`` and ``train-reward``)."""
    parser.add_argument("--config", help="a YAML recipe (see recipes/)")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in output_dir) or a checkpoint directory; "
                                         "the config must match the resumed run's (but for train.max_steps, "
                                         "logging, validation and checkpoint frequency)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the previous run in a non-empty output_dir (its files are removed first)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="end this invocation after N optimizer steps in total, with a checkpoint "
                             "(the schedule still targets train.max_steps)")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    parser.__class__ = _OverridesAfterOptionsParser


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _OverridesAfterOptionsParser(OneLineArgumentParser):
    """Accept ``train refl --config F a.b=1``: argparse alone matches positionals in one run.

    The ``key=value`` words (that are not an option's value) are moved next to the method
    word, so that ``method`` and ``overrides`` are consumed together.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = list(args or [])
        takes_value = {s for a in self._actions if a.nargs != 0 for s in a.option_strings}
        overrides, rest = [], []
        for i, token in enumerate(args):
            is_option_value = i > 0 and args[i - 1] in takes_value
            (overrides if _OVERRIDE.match(token) and not is_option_value else rest).append(token)
        method_at = next((i for i, t in enumerate(rest) if not t.startswith("-") and (i == 0 or rest[i - 1] not in takes_value)), None)
        if method_at is not None:
            rest = rest[: method_at + 1] + overrides + rest[method_at + 1 :]
        else:
            rest = rest + overrides
        return super().parse_known_args(rest, namespace)


def run(args: argparse.Namespace) -> int:
    return run_method(args.method, args)


def run_method(name: str, args: argparse.Namespace) -> int:
    """Load the method's config, then train it on the run skeleton (one-line errors, exit 2)."""
    from ..train.config import ConfigError, to_yaml
    from ..train.loop import TrainingDiverged
    from ..train.registry import load_method_config
    from ..train.run import train

    try:
        cfg = load_method_config(name, args.config, args.overrides)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        result = train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps, overwrite=args.overwrite)
    except TrainingDiverged as exc:
        raise CommandError(str(exc)) from None
    if result.weights_dir is not None:
        print(f"trained {result.step} steps; output: {result.weights_dir}; config: {result.output_dir / 'config.yaml'}")
    else:
        print(f"stopped at step {result.step}; resume with --resume latest")
    return 0
