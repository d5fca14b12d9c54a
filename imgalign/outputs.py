"""Outputs that are never silently lost: refuse a used output location, resume or overwrite on request.

Every command that writes a directory (``sample``, ``eval``, ``filter``, ``eval-reward``,
``demo``, ``train``, ``train-reward``) or a results file (``score``) goes through
:func:`prepare_output_dir` / :func:`prepare_output_file` first:

* an empty or missing location is used as is;
* a location that holds something is refused (one line naming it) unless the user says
  ``--resume`` (continue the run that is there) or ``--overwrite`` (replace it);
* ``--overwrite`` removes the files the command itself writes first, so nothing stale from
  the old run is left beside the new one, and refuses (removing nothing) when the location
  also holds files the command did not write: a mistyped ``--out .`` never deletes a project.

Per-image outputs are written so that an interrupted run is consistent and resumable: an
image is renamed into place complete (:func:`imgalign.images.save_png`), and its JSONL record
is appended and flushed after it, batch by batch (:class:`JsonlAppender`). So every record
names an image that exists, and :func:`resumable_records` can tell exactly what is done.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class OutputExistsError(ValueError):
    """The output location holds a previous run and neither --resume nor --overwrite was given."""


def _entries(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def prepare_output_dir(
    path: str | os.PathLike,
    *,
    outputs: Sequence[str],
    overwrite: bool = False,
    resume: bool = False,
    option: str = "--out",
    resumable: bool = True,
    clear: bool = True,
) -> bool:
    """Check (and with ``overwrite``, clear) an output directory; return True when resuming a previous run.

    ``outputs``: glob patterns of the names the command writes at the top level of the
    directory (hidden temporaries ``.*`` always count as its own). ``resumable=False``: the
    command cannot continue a run (``--resume`` is then an error). ``clear=False`` only checks
    (a multi-process run clears on its main process; see :func:`clear_outputs`).
    """
    path = Path(path)
    if overwrite and resume:
        raise OutputExistsError("give --resume (continue the run) or --overwrite (replace it), not both")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{option} {path} is a file; it must be a directory (new, empty, or a previous run's)")
    entries = _entries(path)
    if resume and not resumable:
        raise OutputExistsError(f"--resume is not supported here; use --overwrite to replace {path}")
    if not entries:
        return False
    if resume:
        return True
    if not overwrite:
        names = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        how = "--resume to continue that run, --overwrite to replace it" if resumable else "--overwrite to replace it"
        raise OutputExistsError(f"{option} {path} is not empty ({names}): pass {how}, or choose another {option}")
    foreign = [p for p in entries if not _ours(p.name, outputs)]
    if foreign:
        raise OutputExistsError(f"--overwrite: {option} {path} also holds {foreign[0].name}, which this command does "
                                f"not write; nothing was removed. Move it away or choose another {option}")  # fmt: skip
    if clear:
        clear_outputs(path, outputs)
    return False


def _ours(name: str, outputs: Sequence[str]) -> bool:
    return name.startswith(".") or any(fnmatch.fnmatchcase(name, pattern) for pattern in outputs)


def clear_outputs(path: str | os.PathLike, outputs: Sequence[str]) -> None:
    """Remove the entries of ``path`` that match ``outputs`` (and hidden temporaries)."""
    for entry in _entries(Path(path)):
        if _ours(entry.name, outputs):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def prepare_output_file(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                        option: str = "--out") -> bool:  # fmt: skip
    """The same policy for a single results file; True when resuming (the file holds records)."""
    path = Path(path)
    if overwrite and resume:
        raise OutputExistsError("give --resume (continue the run) or --overwrite (replace it), not both")
    if path.is_dir():
        raise OutputExistsError(f"{option} {path} is a directory; give a file name (e.g. {path / 'scores.jsonl'})")
    if not path.exists() or path.stat().st_size == 0:
        return False
    if resume:
        return True
    if not overwrite:
        raise OutputExistsError(f"{option} {path} already exists: pass --resume to continue it, --overwrite to "
                                f"replace it, or choose another {option}")  # fmt: skip
    path.unlink()
    return False


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a JSONL file; an incomplete last line (a run killed mid-write) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the torn last line of an interrupted append
                break
            raise ValueError(f"{path}: line {number} is not valid JSON; the file is damaged, use --overwrite") from None
    return records


class JsonlAppender:
    """Append records to a JSONL file, flushed to disk batch by batch (``commit``)."""

    def __init__(self, path: str | os.PathLike, records: Sequence[dict[str, Any]] = ()) -> None:
        """Start the file with ``records`` (those a resumed run keeps), written atomically."""
        from .io import atomic_write_bytes

        self.path = Path(path)
        atomic_write_bytes(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode())
        self._pending: list[str] = []

    def add(self, record: dict[str, Any]) -> None:
        self._pending.append(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON: fail, never write it

    def commit(self) -> None:
        """Write what was added since the last commit, and flush it to disk."""
        if not self._pending:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(self._pending))
            handle.flush()
            os.fsync(handle.fileno())
        self._pending = []


def resumable_records(out: Path, expected: Sequence[dict[str, Any]], jsonl: str = "samples.jsonl") -> list[dict[str, Any]]:
    """The records of an interrupted run in ``out`` that this run would write too, in order.

    ``expected[i]`` holds what record ``i`` must say (file, prompt, seed, settings). A record
    that says otherwise means the options changed: a one-line error naming the first
    difference. Records whose image is missing are dropped (they are redone), and so is
    everything after them.
    """
    existing = read_jsonl(out / jsonl)
    if len(existing) > len(expected):
        raise OutputExistsError(f"--resume: {out / jsonl} has {len(existing)} records but this command makes "
                                f"{len(expected)}: rerun with the interrupted run's options, or --overwrite")  # fmt: skip
    kept = []
    for number, (record, want) in enumerate(zip(existing, expected), 1):
        want = json.loads(json.dumps(want))  # compare as JSON (tuples -> lists, paths -> strings)
        for key, value in want.items():
            if record.get(key) != value:
                raise OutputExistsError(f"--resume: record {number} of {out / jsonl} has {key}={record.get(key)!r} "
                                        f"but this command gives {value!r}: rerun with the interrupted run's options, "
                                        "or --overwrite")  # fmt: skip
        if not (out / record["file"]).is_file():
            break
        kept.append(record)
    return kept


__all__ = [
    "JsonlAppender",
    "OutputExistsError",
    "clear_outputs",
    "prepare_output_dir",
    "prepare_output_file",
    "read_jsonl",
    "resumable_records",
]
