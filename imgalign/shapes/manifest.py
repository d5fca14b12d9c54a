"""The manifest of the shipped Shapes weights: sha256 of every file and the command that built it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(model_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(WEIGHTS_DIR)): sha256(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}


def record(model: str, command: str, metrics: dict | None = None) -> dict:
    """Add (or replace) one model's entry in the manifest."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": {}}
    manifest["models"][model] = {"command": command, "files": files_of(WEIGHTS_DIR / model), "metrics": metrics or {}}
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest["models"][model]


def verify() -> dict[str, list[str]]:
    """Files whose hash differs from the manifest, per model (empty lists when all match)."""
    manifest = json.loads(MANIFEST.read_text())
    return {
        name: [f for f, h in entry["files"].items() if not (WEIGHTS_DIR / f).is_file() or sha256(WEIGHTS_DIR / f) != h]
        for name, entry in manifest["models"].items()
    }
