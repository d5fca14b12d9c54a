"""Packaging: what `pip install -e .` brings, and that the pinned versions cover it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_matplotlib_is_a_base_dependency_and_pinned():
    """`filter`, `eval-reward` and the demo plot with matplotlib, so a plain install must bring it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "matplotlib" in {_name(r) for r in project["dependencies"]}
    pins = {_name(line): line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}  # fmt: skip
    assert re.fullmatch(r"matplotlib==\d+(\.\d+)+", pins.get("matplotlib", "").strip())
