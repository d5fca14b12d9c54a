"""The README's runnable Python example runs as written (offline, tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pipelines_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    runnable = [b for b in blocks if "build_pipeline(" in b]
    assert runnable, "the README lost its runnable pipelines example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(runnable[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["images"].shape == (2, 3, 32, 32)
    assert (tmp_path / "runs" / "readme-lora" / "pytorch_lora_weights.safetensors").is_file()
