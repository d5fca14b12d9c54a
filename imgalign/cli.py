"""The ``imgalign`` command: ``imgalign [--debug] <command> [options]``.

One error boundary for every command. Expected failures (a missing or unreadable file,
corrupt weights, a LoRA or checkpoint of another architecture, a device or backend that is
not there, out of memory, malformed YAML/JSON, a bad value, an output that would be
overwritten) end with **one line** on stderr that names the file or option and says what to
do, and exit status **2**; argument errors are one line too. Anything else is a bug: one line
naming the exception, "run with --debug for the traceback", exit status **1** (a bug is
never passed off as the user's mistake, and never hidden: the line says it is unexpected).
``--debug`` (anywhere on the command line) or ``IMGALIGN_DEBUG=1`` shows the traceback
instead. Ctrl-C exits 130 (outputs written so far are complete; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .commands import CommandError, one_line

# Subcommands, in --help order; each is the module imgalign.commands.<name with "-" -> "_">,
# which gives its own one-line HELP and imports its heavy dependencies inside run().
COMMANDS = ("sample", "score", "eval", "demo", "train", "train-reward", "eval-reward", "filter", "serve-reward",
            "shapes")

# Errors that mean "the user's input is wrong", reported as one line with exit status 2
# (besides these: out of memory, unusable devices, YAML and safetensors errors; see classify).
USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, OSError, ValueError, EOFError, MemoryError)

EXIT_BAD_INPUT = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but an argument error is one line (``imgalign sample: error: ... (see --help)``), exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="imgalign", description="Align diffusion and flow-matching image generators with human preference."
    )
    parser.add_argument("--version", action="version", version=f"imgalign {version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also IMGALIGN_DEBUG=1; accepted anywhere on the line)")
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
    debug = os.environ.get("IMGALIGN_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries(args.command)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"imgalign {args.command}: interrupted (what was written is complete; --resume continues where "
              "supported)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the boundary: every exception becomes one line (or a traceback)
        if debug:
            raise
        code, message = classify(exc)
        print(f"imgalign {args.command}: error: {message}", file=sys.stderr)
        return code


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that reached the command line."""
    if isinstance(exc, CommandError):
        return EXIT_BAD_INPUT, one_line(exc)
    if is_out_of_memory(exc):
        return EXIT_BAD_INPUT, (f"out of memory ({one_line(exc, 120)}): lower --batch-size or the image size, "
                                "or use a device with more memory")  # fmt: skip
    if isinstance(exc, OSError):
        return EXIT_BAD_INPUT, _os_message(exc)
    if isinstance(exc, USER_ERRORS) or isinstance(exc, _library_errors()):
        return EXIT_BAD_INPUT, one_line(exc)
    if _is_device_error(exc):
        return EXIT_BAD_INPUT, f"{one_line(exc, 200)} (use --device cpu, or a machine with that device)"
    return EXIT_BUG, (f"unexpected {type(exc).__name__}: {one_line(exc, 200)} -- this is a bug in imgalign, "
                      "not in your input; run with --debug for the traceback")  # fmt: skip


def _os_message(exc: OSError) -> str:
    """A file-system error as '<what>: <file>' plus what to do when there is something to do."""
    if exc.filename is None or not exc.strerror:
        return one_line(exc)
    what = f"{exc.strerror}: {exc.filename}"
    if exc.errno == errno.ENOSPC:
        return f"{what} (the disk is full: free space and rerun with --resume where supported)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what} (no permission to write or read it: choose another location)"
    return what


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA/MPS/CPU allocation failure (torch.OutOfMemoryError, or the allocator's RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                              or "DefaultCPUAllocator" in text)  # fmt: skip


def _is_device_error(exc: BaseException) -> bool:
    """torch's way of saying a device or backend is not usable here (no driver, not compiled with it)."""
    text = str(exc)
    markers = ("Torch not compiled with", "NVIDIA driver", "CUDA driver", "no CUDA GPUs", "CUDA error",
               "no kernel image is available", "MPS backend", "device type at start of device string")  # fmt: skip
    return isinstance(exc, (RuntimeError, AssertionError)) and any(m in text for m in markers)


def _library_errors() -> tuple[type[BaseException], ...]:
    """Errors from libraries that describe bad input (looked up only if the library is loaded)."""
    errors: list[type[BaseException]] = []
    if "pipelines" in sys.modules:
        errors.append(sys.modules["pipelines"].AttentionBackendError)
    if "yaml" in sys.modules:
        errors.append(sys.modules["yaml"].YAMLError)
    if "safetensors" in sys.modules and hasattr(sys.modules["safetensors"], "SafetensorError"):
        errors.append(sys.modules["safetensors"].SafetensorError)
    if "imgalign.train.loop" in sys.modules:
        errors.append(sys.modules["imgalign.train.loop"].TrainingDiverged)
    return tuple(errors)


def quiet_libraries(command: str) -> None:
    """Silence load-time notices that say nothing to the user (diffusers/transformers warnings, their
    local-loading progress bars). Download progress bars (huggingface_hub's) stay on.

    Set through the libraries' environment variables when they are not imported yet (so a
    command that never loads them pays nothing), through their logging API when they are.
    """
    import warnings

    # Deprecation notices of libraries are for their callers (us), not for the user; our own
    # warnings (a tiny input image, a checkpoint without loss-scaler state) are one line each.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # notices about what the toolkit does on purpose: several LoRAs on one model (segments), an
    # optimizer step skipped by fp16 loss scaling before the LR scheduler's step
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    warnings.formatwarning = lambda message, category, *rest, **kw: f"imgalign {command}: warning: {message}\n"
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "diffusers" in sys.modules or command in ("sample", "eval", "demo", "train"):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()  # "Loading pipeline components": local, instant
    if "transformers" in sys.modules or command in ("sample", "eval", "demo", "train"):
        from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
        from transformers.utils import logging as transformers_logging

        downloads_were_off = are_progress_bars_disabled()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()  # "Loading weights": local, instant
        if not downloads_were_off:
            enable_progress_bars()  # transformers switched huggingface_hub's off too; downloads keep theirs


if __name__ == "__main__":
    sys.exit(main())
