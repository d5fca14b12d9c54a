"""Reading preference and curation datasets: JSONL (always), Parquet and ``datasets`` dirs (when installed).

A dataset is a list of records (dicts). Image fields hold a path (relative paths resolve
against the dataset's directory), raw bytes, a ``data:image/...;base64,`` string, or a
``{"bytes": ..., "path": ...}`` struct (the Hugging Face ``Image`` feature's storage).

* ``.jsonl`` -- stdlib only; a malformed line is an error naming the file and line.
* ``.parquet`` -- needs ``pyarrow``.
* a directory written by ``datasets.Dataset.save_to_disk`` -- needs ``datasets``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

from torch import Tensor

__all__ = ["DatasetFormatError", "base_dir", "dataset_format", "find_key", "load_image_value", "read_records"]


class DatasetFormatError(ValueError):
    """The dataset file cannot be read (missing, malformed, or its reader is not installed)."""


def dataset_format(path: str | os.PathLike) -> str:
    """``"jsonl"``, ``"parquet"`` or ``"hf"`` (a ``save_to_disk`` directory)."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf"
        raise DatasetFormatError(f"{p} is a directory but not a Hugging Face datasets directory (no state.json)")
    if not p.is_file():
        raise DatasetFormatError(f"dataset {p} does not exist")
    if p.suffix in (".jsonl", ".json") or p.name.endswith(".jsonl.txt"):
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    raise DatasetFormatError(f"{p}: unsupported dataset format (use .jsonl, .parquet or a datasets directory)")


def base_dir(path: str | os.PathLike) -> Path:
    """The directory relative image paths resolve against: a file's folder, or the datasets directory itself."""
    p = Path(path).resolve()
    return p if p.is_dir() else p.parent


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a dataset, in order."""
    p = Path(path)
    fmt = dataset_format(p)
    if fmt == "jsonl":
        records = []
        with p.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetFormatError(f"{p}:{number}: invalid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise DatasetFormatError(f"{p}:{number}: each line must be a JSON object")
                records.append(record)
        return records
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetFormatError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(str(p)).to_pylist()
    try:
        import datasets
    except ImportError:
        raise DatasetFormatError(f"{p}: reading a datasets directory needs `datasets` (pip install datasets)") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetFormatError(f"{p} holds several splits ({', '.join(ds)}); point at one split's directory")
    # Image columns as ``{"bytes", "path"}`` structs instead of PIL images (we decode ourselves).
    # ``cast_column`` only changes the decoding; ``cast`` would run ``map`` and write cache files
    # into the input directory.
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return [dict(row) for row in ds.with_format(None)]


def find_key(record: dict, explicit: str | None, candidates: tuple[str, ...], what: str, required: bool = True):
    """The record key to use for ``what``: ``explicit`` if given, else the first candidate present."""
    if explicit:
        if explicit not in record:
            raise DatasetFormatError(f"records have no {explicit!r} field for {what} (fields: {', '.join(record)})")
        return explicit
    for key in candidates:
        if key in record:
            return key
    if required:
        raise DatasetFormatError(f"no {what} field found (looked for {', '.join(candidates)}; fields: {', '.join(record)})")
    return None


def load_image_value(value, base_dir: str | os.PathLike | None = None) -> Tensor:
    """An image field as float ``[1,3,H,W]`` in ``[0,1]`` (RGB). Raises on missing/unreadable images.

    Decoding is :func:`rewards.images.load_image` (every PIL mode, EXIF orientation, alpha on white).
    """
    from .images import load_image

    source: str | io.BytesIO
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(value))
    elif isinstance(value, str) and value.startswith("data:image/"):
        source = io.BytesIO(base64.b64decode(value.split(",", 1)[1]))
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        source = str(path)
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    return load_image(source, name=None if isinstance(source, str) else "image bytes")
