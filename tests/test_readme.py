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


# ============================================================================= the README's Shapes commands
# Every `imgalign` command the README shows for the shipped Shapes models runs, from a temporary
# working directory (a fresh clone used from anywhere), in README order. Options appended at the
# end make each one small (argparse and config overrides: the last value wins); nothing else is
# changed, so a renamed option, recipe, prompt set or reward in the README fails here.
import shlex  # noqa: E402

import pytest  # noqa: E402

#: What marks a README command as one for the shipped Shapes models.
SHAPES_MARKERS = ("shapes", "recipes/reward.yaml", "imgalign demo", "runs/reward/reward")

#: README command prefix -> (how it is checked, what is appended to make it small).
#: "run": run here; "slow": run in the slow test (training); "config": a training command whose
#: recipe, method and overrides must resolve (``--print-config``; each method's own tests train
#: it); "parse": arguments and names only (the demo's training methods each take minutes;
#: tests/test_shapes_demo.py runs them small).
SMALL_EVAL = ["--num-prompts", "2", "--images-per-prompt", "1", "--steps", "2", "--batch-size", "4"]
SMALL_REWARD = ["train.max_steps=2", "train.batch_size=4", "train.checkpoint_every=1", "validation.every=1",
                "train.report_to=[]"]  # fmt: skip
COVERAGE = {
    "imgalign sample --pipeline shapes": ("run", ["--num-images", "2", "--steps", "2"]),
    "imgalign sample --pipeline shapes --prompts prompts.txt": ("run", ["--steps", "2", "--best-of", "4",
                                                                        "--search-rounds", "1"]),  # fmt: skip
    "imgalign score --reward shapes-oracle": ("run", []),
    "imgalign eval --pipeline shapes --prompt-set shapes-heldout --reward": ("run", SMALL_EVAL),
    "imgalign eval --pipeline shapes --prompt-set shapes-heldout-eval": ("run", [*SMALL_EVAL, "--best-of", "2"]),
    "imgalign train ": ("config", ["--print-config"]),
    "imgalign train dpo --config recipes/shapes_verifier_dpo.yaml": (
        "slow", ["train.max_steps=1", "train.batch_size=2", "sampling.num_steps=3", "validation.num_images=1",
                 "train.report_to=[]"]),  # fmt: skip
    "imgalign train nft --config recipes/shapes_oracle_nft.yaml": (
        "slow", ["train.max_steps=1", "train.batch_size=2", "sampling.num_steps=3", "validation.num_images=1",
                 "train.report_to=[]", "nft.group_size=4", "nft.train_batch_size=8"]),  # fmt: skip
    "imgalign train-reward --config recipes/reward.yaml": ("slow", SMALL_REWARD),
    "imgalign eval-reward --reward runs/reward/reward": ("slow", []),
    "imgalign demo --algo": ("parse", []),
    "imgalign demo --reward": ("parse", []),
    "imgalign demo": ("parse", []),  # tests/test_shapes_demo.py runs the default demo, small
}


def readme_commands() -> list[str]:
    """Every `imgalign ...` line of the README's bash blocks: continuations joined, comments dropped,
    ``a|b|c`` alternatives of an option value expanded."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            line = " ".join(line.split())
            if not line.startswith("imgalign "):
                continue
            words = line.split(" ")
            choice = next((i for i, w in enumerate(words) if "|" in w and not w.startswith("-")), None)
            if choice is None:
                commands.append(line)
            else:
                commands += [" ".join([*words[:choice], alt, *words[choice + 1 :]]) for alt in words[choice].split("|")]
    return commands


def shapes_commands() -> list[tuple[str, str, list[str]]]:
    """(command, how, what to append) for the README's Shapes commands, in README order."""
    out = []
    for command in readme_commands():
        if not any(marker in command for marker in SHAPES_MARKERS):
            continue
        prefix = max((p for p in COVERAGE if command.startswith(p)), key=len, default=None)
        assert prefix is not None, f"README command not covered by tests/test_readme.py COVERAGE: {command}"
        how, extra = COVERAGE[prefix]
        out.append((command, how, extra))
    return out


def _write_shapes_pairs(root: Path) -> None:
    """Tiny stand-ins for the pairs recipes/reward.yaml trains on (its comment makes the real ones)."""
    import json

    import torch

    from imgalign.images import save_png

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        folder = root / "runs" / "shapes-pairs" / split
        folder.mkdir(parents=True)
        rows = []
        for i, label in enumerate(["A", "B", "tie", "A"]):
            for side in "ab":
                save_png(torch.rand(3, 32, 32, generator=g), folder / f"{i}_{side}.png")
            rows.append({"image_a": f"{i}_a.png", "image_b": f"{i}_b.png", "label": label,
                         "prompt": "a picture of a large red circle on the left on a white background",
                         "labels": {"prompt": label, "quality": "A" if i % 2 else "B"}})  # fmt: skip
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _run_readme_commands(kinds: set[str], tmp_path: Path, monkeypatch) -> list[str]:
    from imgalign.cli import build_parser, main
    from imgalign.shapes.demo import check_algorithm

    monkeypatch.chdir(tmp_path)
    # the README's `--prompts prompts.txt` is the user's own file; here two Shapes prompts
    (tmp_path / "prompts.txt").write_text("a picture of a large red circle on the left on a white background\n"
                                          "a picture of a small blue square at the top on a black background\n")
    ran = []
    for command, how, extra in shapes_commands():
        argv = shlex.split(command)[1:]
        if how == "parse":  # arguments and names only
            args = build_parser().parse_args(argv)
            check_algorithm(args.algo) if args.algo != "compare" else None
            continue
        if how == "config":
            assert main([*argv, *extra]) == 0, command
            continue
        if how not in kinds:
            continue
        assert main([*argv, *extra]) == 0, command
        ran.append(command)
    return ran


def test_readme_shapes_commands_are_all_covered():
    commands = shapes_commands()
    kinds = {how for _, how, _ in commands}
    assert {"run", "slow", "parse"} <= kinds and len(commands) >= 12


def test_readme_shapes_commands_run_from_any_directory(tmp_path, monkeypatch):
    ran = _run_readme_commands({"run"}, tmp_path, monkeypatch)
    assert any(c.startswith("imgalign score") for c in ran)
    records = [line for line in (tmp_path / "runs" / "samples-scores.jsonl").read_text().splitlines() if line]
    assert len(records) == 2 and '"error"' not in records[0]  # the two samples, each with its own prompt; no grid
    assert (tmp_path / "runs" / "eval-best-of-8" / "report.json").is_file()


@pytest.mark.slow
def test_readme_shapes_training_commands_run_from_any_directory(tmp_path, monkeypatch):
    _write_shapes_pairs(tmp_path)
    ran = _run_readme_commands({"slow"}, tmp_path, monkeypatch)
    assert len(ran) >= 5
    assert (tmp_path / "runs" / "shapes_verifier_dpo" / "lora" / "README.md").is_file()  # the model card
    assert (tmp_path / "runs" / "reward" / "reward" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "eval-reward" / "report.json").is_file()
