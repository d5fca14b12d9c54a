"""Shared pieces of the benchmark scripts: machine info, timing, tables and JSON.

Every figure is a ratio against a baseline measured in the same process, on the same model,
with runs interleaved (baseline, ours, baseline, ours, ...) so clock drift and thermal
state hit both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/<figure>.py` from a checkout
    sys.path.insert(0, str(ROOT))


def machine_info() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": "cpu",
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["threads"] = torch.get_num_threads()
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1) -> dict[str, dict[str, float | None]]:
    """Median seconds and peak memory of each function, runs interleaved after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float | None] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            reset_peak(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            peak = peak_gib(device)
            peaks[name] = peak if peaks.get(name) is None else max(peaks[name], peak)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "peak_gib": peaks[name]} for name, t in times.items()}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Print rows as a markdown table and return it."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    return table


def write_json(name: str, rows: list[dict[str, Any]], settings: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    out_dir = Path(out_dir or os.environ.get("BENCH_OUT") or ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"figure": name, "machine": machine_info(), "settings": settings, "rows": rows}, indent=2))
    return path
