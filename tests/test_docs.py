"""The user guide cannot drift from the code: the CLI reference, the tables and the snippets.

* ``docs/cli.md`` equals what ``docs/make_cli_reference.py`` generates from the parsers now,
  and every worked example in it parses;
* the README's methods table lists exactly the registered methods, and its rewards table every
  registered reward, with the right "differentiable" column for those that load offline;
* the Python snippets of ``docs/guide.md`` run as written.

Registry contents are read in a fresh interpreter: other tests register methods and rewards of
their own in this process.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"
GENERATOR = ROOT / "docs" / "make_cli_reference.py"


def _fresh(code: str) -> object:
    """The JSON printed by ``code`` run in a new interpreter (no registrations from other tests)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(text: str, header: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_cli_reference_matches_the_parsers():
    out = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr or out.stdout


def test_cli_reference_examples_parse():
    from imgalign.cli import build_parser

    spec = importlib.util.spec_from_file_location("make_cli_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = build_parser()
    for name, (_, command) in module.EXAMPLES.items():
        argv = shlex.split(command)
        assert argv[:2] == ["imgalign", name], command
        parser.parse_args(argv[1:])  # exits (fails the test) on a renamed or removed option


def test_methods_table_matches_the_registry():
    registered = _fresh("import json; from imgalign.train.registry import available_methods; "
                        "print(json.dumps(list(available_methods())))")  # fmt: skip
    rows = _table(README.read_text(), "| method | optimises |")
    listed = [_names(row[0])[0] for row in rows]
    assert sorted(listed) == sorted(registered), "README methods table vs imgalign/train/registry.py"
    for row in rows:
        differentiable = row[3]
        assert differentiable.startswith(("needed", "not needed", "—")), row


#: Rewards that load offline in a test (shipped weights or none needed): their table rows are
#: checked against the loaded reward's own RewardInfo.
OFFLINE_REWARDS = ("shapes-oracle", "shapes-clip", "shapes-clip-contrast", "shapes-verifier", "shapes-preference",
                   "shapes-edit-reward", "shapes-edit-reward-base", "jpeg-compressibility", "jpeg-incompressibility")


def test_rewards_table_matches_the_registry():
    facts = _fresh(
        "import json, rewards; names = rewards.available(); infos = {n: rewards.load(n).info for n in "
        f"{list(OFFLINE_REWARDS)!r}}}; print(json.dumps({{'names': names, 'differentiable': "
        "{n: i.differentiable for n, i in infos.items()}, 'inputs': {n: list(i.inputs) for n, i in infos.items()}}))")
    rows = _table(README.read_text(), "| name | inputs | differentiable |")
    by_name = {name: row for row in rows for name in _names(row[0])}
    missing = sorted(set(facts["names"]) - set(by_name))
    assert not missing, f"README rewards table misses registered rewards: {missing}"
    for name, differentiable in facts["differentiable"].items():
        cell = by_name[name][2]
        assert cell.startswith("yes" if differentiable else "no"), (name, cell)
        if "source_images" in facts["inputs"][name]:
            assert "source_images" in by_name[name][1], name


@pytest.mark.slow
def test_guide_python_snippets_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 3, "the guide lost its snippets (one per layer)"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/guide.md snippet {i + 1}", "exec"), {})  # noqa: S102
    assert (tmp_path / "runs" / "guide-dpo" / "lora").is_dir()
