"""Subcommands of the ``imgalign`` command line.

Each module here is one subcommand and exposes ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``. ``imgalign.cli`` lists them, parses, and turns a
:class:`CommandError` (or the bad-input errors listed in ``imgalign.cli``) into one clear
line on stderr and a non-zero exit, never a traceback.

The helpers below are what every command uses where input enters: :func:`resolve_device`
(``--device``), :func:`blame` (a load that fails names the option and the file), and
:func:`add_output_arguments` (``--overwrite`` / ``--resume``). This module imports no torch at
import time, so ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator


class CommandError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def one_line(err: BaseException | str, limit: int = 2000) -> str:
    """An exception's message on one line (whitespace collapsed), shortened to ``limit`` characters.

    The default keeps whole lists (every bad row of a pairs file) and only stops a runaway message.
    """
    text = " ".join(str(err).split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device(value: str | None, option: str = "--device") -> str:
    """``--device`` checked where it enters: a device torch knows and can use here (default: cuda if available)."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise CommandError(f"{option} {value!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"{option} {value}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                               f"use {option} cpu")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(f"{option} {value}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise CommandError(f"{option} {value}: the {device.type} backend is not available in this torch build; "
                               f"use {option} cpu")  # fmt: skip
    return value


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a failed load of user-given weights or files raises (corrupt, wrong architecture, missing)."""
    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    return tuple(errors)


@contextlib.contextmanager
def blame(option: str, value: object = None) -> Iterator[None]:
    """Turn a failed load into a :class:`CommandError` that names the option (and its value, unless the
    message already names it): ``--lora runs/x/lora: ... does not fit this shapes pipeline``.

    Out-of-memory errors pass through (the CLI reports them as such); so does a
    :class:`CommandError` raised inside.
    """
    try:
        yield
    except CommandError:
        raise
    except _load_errors() as err:
        from ..cli import is_out_of_memory

        if is_out_of_memory(err):
            raise
        message = one_line(err)
        if message.startswith(option):
            raise CommandError(message) from err
        named = value is None or str(value) in message
        raise CommandError(f"{option}: {message}" if named else f"{option} {value}: {message}") from err


def add_output_arguments(parser: argparse.ArgumentParser, *, resumable: bool = True) -> None:
    """``--overwrite`` (and ``--resume``): what to do when the output location already holds a run."""
    if resumable:
        parser.add_argument("--resume", action="store_true",
                            help="continue the run already in --out (skips what it finished; the options must match)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the previous run in --out (its files are removed first)")


def prepare_out(args: argparse.Namespace, outputs: tuple[str, ...], *, resumable: bool = True,
                option: str = "--out", clear: bool = True) -> bool:  # fmt: skip
    """:func:`imgalign.outputs.prepare_output_dir` for ``args.out``, as a one-line error; True when resuming."""
    from ..outputs import OutputExistsError, prepare_output_dir

    try:
        return prepare_output_dir(args.out, outputs=outputs, overwrite=args.overwrite,
                                  resume=getattr(args, "resume", False), option=option, resumable=resumable,
                                  clear=clear)  # fmt: skip
    except OutputExistsError as err:
        raise CommandError(str(err)) from None
