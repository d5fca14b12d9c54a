"""The ``imgalign`` command: ``imgalign <command> [options]``.

Bad input (a missing file, an unsupported pipeline, a size the VAE cannot take, an empty
prompt file, ...) ends with one line on stderr and exit status 2, never a traceback. Set
``IMGALIGN_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands import CommandError

# Subcommands, in --help order; each is the module imgalign.commands.<name with "-" -> "_">,
# which gives its own one-line HELP and imports its heavy dependencies inside run().
COMMANDS = ("sample", "score", "eval", "demo", "train", "train-reward", "eval-reward", "filter", "shapes")

# Errors that mean "the user's input is wrong", reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, FileNotFoundError, NotADirectoryError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgalign", description="Align diffusion and flow-matching image generators with human preference."
    )
    parser.add_argument("--version", action="version", version=f"imgalign {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"imgalign.commands.{name.replace('-', '_')}"
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def version() -> str:
    """The installed package's version (the source tree's ``__version__`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("imgalign")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["--version"], ["-V"]):  # answered before the subcommands (and torch) are imported
        print(f"imgalign {version()}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS + _library_errors() as exc:
        if os.environ.get("IMGALIGN_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"imgalign {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imgalign {args.command}: interrupted", file=sys.stderr)
        return 130


def _library_errors() -> tuple[type[BaseException], ...]:
    """Errors from our layers that describe bad input (imported lazily: they pull in torch)."""
    errors: list[type[BaseException]] = []
    if "pipelines" in sys.modules:
        errors.append(sys.modules["pipelines"].AttentionBackendError)
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
