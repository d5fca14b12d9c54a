"""The manifest of the shipped Shapes weights: sha256 of every file and the command that built it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(model_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> dict[str, str]:
    return {str(p.relative_to(weights_dir)): sha256(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}


def record(model: str, command: str, metrics: dict | None = None, weights_dir: Path = WEIGHTS_DIR) -> dict:
    """Add (or replace) one model's entry in ``weights_dir/manifest.json``."""
    from ..io import atomic_write_bytes

    manifest_path = Path(weights_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": {}}
    manifest["models"][model] = {"command": command, "files": files_of(Path(weights_dir) / model, Path(weights_dir)),
                                 "metrics": metrics or {}}  # fmt: skip
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest["models"][model]


def verify(weights_dir: Path = WEIGHTS_DIR) -> dict[str, list[str]]:
    """Files whose hash differs from the manifest, per model (empty lists when all match)."""
    weights_dir = Path(weights_dir)
    manifest = json.loads((weights_dir / "manifest.json").read_text())
    return {
        name: [f for f, h in entry["files"].items() if not (weights_dir / f).is_file() or sha256(weights_dir / f) != h]
        for name, entry in manifest["models"].items()
    }
