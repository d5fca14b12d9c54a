"""A training run's ``output_dir``: never silently reused, cleared on ``--overwrite``, resumed only as the same run.

Why: a second ``imgalign train`` into the directory of a first one used to overwrite its LoRA,
truncate its ``metrics.jsonl`` and leave its checkpoints beside the new run's, so that a later
``--resume latest`` continued the wrong run; and a resume with a changed loss or learning
rate silently mixed two runs under one ``config.yaml``. Now:

* a non-empty ``output_dir`` is refused unless ``--resume`` (continue it) or ``--overwrite``
  (remove the previous run's files first; refused, removing nothing, if the directory also
  holds files no training run writes);
* a resume compares the config with the one saved by the run it continues and refuses any
  difference outside :data:`SAFE_TO_CHANGE_ON_RESUME`, naming the keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..outputs import OutputExistsError, clear_outputs, prepare_output_dir
from .config import ConfigError

#: Top-level names a training run writes into ``output_dir`` (what ``--overwrite`` removes).
TRAINING_OUTPUTS = ("config.yaml", "metrics.jsonl", "final_metrics.json", "checkpoints", "logs", "validation",
                    "lora", "pipeline", "reward", "README.md", "samples", "events.out.tfevents.*")  # fmt: skip

#: Config keys a resumed run may change: they decide how long to run and what to log or save,
#: not what is trained. (``train.max_steps`` also stretches a decaying LR schedule from the
#: resume point on; the resumed run is then a longer run, not a replay of the old one.)
SAFE_TO_CHANGE_ON_RESUME = (
    "output_dir",  # resuming another directory's checkpoint into a new one (a fork)
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoints_total_limit",
    "train.max_nonfinite_steps",
    "train.report_to",
    "validation.every",
    "train.distributed",  # checkpoints hold full (unsharded) state either way: resume with DDP or FSDP,
    "train.fsdp",  # on any number of processes
)


def check_output_dir(out_dir: str | Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse a used ``output_dir`` (read-only: every process may call it). See the module docstring."""
    out_dir = Path(out_dir)
    if resume is not None and overwrite:
        raise OutputExistsError("give --resume (continue the run in output_dir) or --overwrite (replace it), not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output_dir {out_dir} is a file; it must be a directory")
    if resume is not None:
        return
    try:
        prepare_output_dir(out_dir, outputs=TRAINING_OUTPUTS, overwrite=overwrite, option="output_dir", clear=False)
    except OutputExistsError as err:
        if overwrite:
            raise
        raise OutputExistsError(f"output_dir {out_dir} holds a previous run: pass --resume latest to continue it, "
                                "--overwrite to replace it, or set output_dir=... to a new directory") from err  # fmt: skip


def clear_output_dir(out_dir: str | Path) -> None:
    """Remove the previous run's files (main process only, after :func:`check_output_dir`)."""
    clear_outputs(out_dir, TRAINING_OUTPUTS)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and key not in ("reward", "reward_options"):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       safe: tuple[str, ...] = SAFE_TO_CHANGE_ON_RESUME) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """``(dotted key, saved value, current value)`` for every difference outside ``safe``."""
    old, new = dict(_flatten(saved)), dict(_flatten(current))
    missing = object()
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in safe or any(key.startswith(s + ".") for s in safe):
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            diffs.append((key, None if a is missing else a, None if b is missing else b))
    return diffs


def check_resume_config(checkpoint: Path, out_dir: Path, current: Mapping[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` with a config that differs beyond the safe keys (one line naming them).

    The saved config is the checkpoint's own ``config.yaml`` (else the one in ``output_dir``).
    """
    for source in (checkpoint / "config.yaml", out_dir / "config.yaml"):
        if source.is_file():
            break
    else:
        return  # a checkpoint from before configs were saved with it: nothing to compare
    try:
        saved = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{source} is not valid YAML; cannot check the resumed run's config") from None
    diffs = config_differences(saved, current)
    if not diffs:
        return
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs[:4])
    more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
    raise ConfigError(f"--resume {checkpoint}: the config differs from the run being resumed ({shown}{more}); "
                      "only train.max_steps, report_to and the logging/validation/checkpoint frequencies may change: "
                      "undo the change, or start a new run (--overwrite or another output_dir)")  # fmt: skip


__all__ = ["SAFE_TO_CHANGE_ON_RESUME", "TRAINING_OUTPUTS", "check_output_dir", "check_resume_config",
           "clear_output_dir", "config_differences"]  # fmt: skip
