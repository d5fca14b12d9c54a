"""Outputs are never silently lost: --resume continues where a run stopped, --overwrite replaces it
completely (and never touches files it did not write), a training resume is the same run, checkpoint
rotation prunes only the current run's, a trained LoRA gets a model card, and the CLI's error boundary."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import imgalign.sampling
from imgalign.cli import main
from imgalign.train.checkpoint import CheckpointManager, TrainerState, list_checkpoints
from imgalign.train.output_dir import SAFE_TO_CHANGE_ON_RESUME, config_differences

SAMPLE = ["sample", "--pipeline", "shapes", "--prompt", "a picture of a large red circle on the left on a white background",
          "--num-images", "4", "--batch-size", "2", "--steps", "2"]  # fmt: skip
EVAL = ["eval", "--pipeline", "shapes", "--prompt-set", "shapes-heldout", "--num-prompts", "2", "--images-per-prompt", "2",
        "--steps", "2", "--batch-size", "2", "--reward", "shapes-oracle,shapes-clip"]  # fmt: skip


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def interrupt_after(monkeypatch):
    """Make the N+1-th sampler call raise KeyboardInterrupt (Ctrl-C in the middle of a run)."""

    def arm(calls: int) -> None:
        real = imgalign.sampling.run_sampler
        seen = []

        def flaky(*args, **kwargs):
            if len(seen) == calls:
                raise KeyboardInterrupt
            seen.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(imgalign.sampling, "run_sampler", flaky)

    return arm


# ----------------------------------------------------------------------------- sample / eval: interrupted, resumed
def test_an_interrupted_sample_is_consistent_and_resumes_to_the_same_files(tmp_path, interrupt_after, monkeypatch, capsys):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert main([*SAMPLE, "--out", str(reference)]) == 0

    interrupt_after(1)  # the first batch (2 images) is written, then Ctrl-C
    assert main([*SAMPLE, "--out", str(interrupted)]) == 130
    assert "interrupted" in capsys.readouterr().err
    records = [json.loads(line) for line in (interrupted / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["0000.png", "0001.png"]  # every record names a complete image
    assert sorted(p.name for p in interrupted.iterdir()) == ["0000.png", "0001.png", "samples.jsonl"]
    with (interrupted / "samples.jsonl").open("a") as f:
        f.write('{"file": "0002.png", "pro')  # and a record torn by the kill
    monkeypatch.undo()

    assert main([*SAMPLE, "--out", str(interrupted)]) == 2  # a used --out is refused ...
    assert "--resume" in capsys.readouterr().err
    assert main([*SAMPLE, "--out", str(interrupted), "--resume"]) == 0  # ... and continued on request
    assert "resuming: 2 of 4" in capsys.readouterr().out
    assert _files(interrupted) == _files(reference)  # the same images, records and grid as the uninterrupted run


def test_an_interrupted_eval_resumes_without_rescoring_and_reports_the_same(tmp_path, interrupt_after, monkeypatch):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert main([*EVAL, "--out", str(reference)]) == 0
    records = [json.loads(line) for line in (reference / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and set(records[0]["scores"]) == {"shapes-oracle", "shapes-clip"}
    assert "shapes-oracle" in records[0]["details"]  # the oracle's aspects, per image

    interrupt_after(1)
    assert main([*EVAL, "--out", str(interrupted)]) == 130
    assert len((interrupted / "samples.jsonl").read_text().splitlines()) == 2
    monkeypatch.undo()
    assert main([*EVAL, "--out", str(interrupted), "--resume"]) == 0

    def report(out: Path) -> dict:
        data = json.loads((out / "report.json").read_text())
        data.pop("settings")  # says --resume
        return data

    assert report(interrupted) == report(reference)
    assert _files(interrupted) == {k: v for k, v in _files(reference).items() if k != "report.json"} | {
        "report.json": (interrupted / "report.json").read_bytes()}  # fmt: skip
    assert main([*EVAL[:-1], "shapes-oracle", "--out", str(interrupted), "--resume"]) == 2  # other rewards: refused


def test_overwrite_replaces_the_previous_run_and_never_foreign_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*SAMPLE, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    assert main([*SAMPLE, "--num-images", "1", "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and _files(out) == before  # nothing removed
    (out / "notes.txt").unlink()
    assert main([*SAMPLE, "--num-images", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "grid.png", "samples.jsonl"]  # no stale 0001-0003


def test_files_are_written_with_the_umask_s_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        assert main([*SAMPLE, "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for path in [tmp_path / "out", *(tmp_path / "out").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


# ----------------------------------------------------------------------------- score
def test_score_reads_a_sample_directory_with_its_prompts_and_never_scores_the_grid(tmp_path, capsys):
    samples = tmp_path / "samples"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a picture of a large red circle on the left on a white background\n"
                       "a picture of a small blue square at the top on a black background\n")  # fmt: skip
    assert main(["sample", "--pipeline", "shapes", "--prompts", str(prompts), "--steps", "2", "--out", str(samples)]) == 0
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--reward", "shapes-oracle,shapes-clip", "--images", str(samples), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["file"]).name for r in records] == ["0000.png", "0001.png"]  # no grid.png
    assert [r["prompt"] for r in records] == prompts.read_text().splitlines()  # each its own prompt
    assert all("error" not in r and set(r["scores"]) == {"shapes-oracle", "shapes-clip"} for r in records)

    # a plain directory: every image but the grid
    (samples / "samples.jsonl").unlink()
    plain = tmp_path / "plain.jsonl"
    assert main(["score", "--reward", "shapes-oracle", "--images", str(samples), "--prompts", str(prompts),
                 "--out", str(plain)]) == 0  # fmt: skip
    assert [Path(json.loads(line)["file"]).name for line in plain.read_text().splitlines()] == ["0000.png", "0001.png"]

    # --resume scores only what is missing
    out.write_text(out.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    assert main(["score", "--reward", "shapes-oracle,shapes-clip", "--images", str(samples), "--prompts", str(prompts),
                 "--out", str(out), "--resume"]) == 0  # fmt: skip
    assert "resuming: 1 of 2" in capsys.readouterr().out
    assert [json.loads(line)["file"] for line in out.read_text().splitlines()] == [r["file"] for r in records]


# ----------------------------------------------------------------------------- training: resume config, rotation
def test_a_resume_may_change_only_the_safe_keys():
    saved = {"output_dir": "a", "optim": {"lr": 1e-3}, "lora": {"rank": 8}, "reward": {"x": 1.0},
             "train": {"max_steps": 40, "log_every": 1, "report_to": []}, "validation": {"every": 0, "num_images": 4}}
    safe = json.loads(json.dumps(saved))
    safe.update(output_dir="b")
    safe["train"].update(max_steps=80, log_every=5, report_to=["tensorboard"])
    safe["validation"]["every"] = 10
    assert config_differences(saved, safe) == []
    changed = json.loads(json.dumps(saved))
    changed["lora"]["rank"], changed["optim"]["lr"], changed["reward"] = 4, 0.1, {"x": 1.0, "y": 0.5}
    changed["validation"]["num_images"] = 8
    assert [k for k, _, _ in config_differences(saved, changed)] == ["lora.rank", "optim.lr", "reward",
                                                                      "validation.num_images"]  # fmt: skip
    assert "train.max_steps" in SAFE_TO_CHANGE_ON_RESUME and "optim.lr" not in SAFE_TO_CHANGE_ON_RESUME


def test_checkpoint_rotation_prunes_only_the_current_runs_checkpoints(tmp_path):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    manager = CheckpointManager(tmp_path, total_limit=2)
    parts = {"trainable": {"p": param}, "optimizer": optimizer, "lr_scheduler": scheduler}
    for step in (1, 2, 3):  # an old run (another run_id) left three checkpoints
        manager.save(TrainerState(step=step, run_id="old"), **parts)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002", "checkpoint-000003"]
    for step in (10, 11, 12):
        manager.save(TrainerState(step=step, run_id="new"), **parts)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["checkpoint-000002", "checkpoint-000003", "checkpoint-000011", "checkpoint-000012"]
    assert manager.load(tmp_path / "checkpoint-000012", **parts).run_id == "new"  # a resume keeps the run's id


def test_a_corrupt_checkpoint_is_one_error_naming_it(tmp_path):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = {"trainable": {"p": param}, "optimizer": optimizer, "lr_scheduler": scheduler}
    path = CheckpointManager(tmp_path).save(TrainerState(step=1), **parts)
    (path / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="checkpoint-000001 does not load .*--overwrite"):
        CheckpointManager(tmp_path).load(path, **parts)


# ----------------------------------------------------------------------------- training: output_dir, model card
DRAFT = ["train", "draft", "--config", "recipes/shapes_verifier_draft.yaml", "train.max_steps=2", "train.batch_size=2",
         "sampling.num_steps=3", "validation.num_images=1", "train.checkpoint_every=1", "train.report_to=[]",
         "draft.k=1"]  # fmt: skip


def _steps(out: Path) -> list[int]:
    """The steps metrics.jsonl has records for (the final validation adds a second record at the last step)."""
    return sorted({json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()})


@pytest.mark.slow
def test_training_output_dir_is_refused_overwritten_or_resumed_and_the_lora_has_a_model_card(tmp_path, monkeypatch,
                                                                                              capsys):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the recipe and the shipped model resolve from any directory
    out = tmp_path / "run"
    argv = [*DRAFT, f"output_dir={out}"]
    assert main([*argv, "--stop-after-steps", "1"]) == 0
    assert main(argv) == 2 and "--resume latest" in capsys.readouterr().err
    assert main([*argv, "lora.rank=4", "--resume", "latest"]) == 2
    assert "lora.rank: 8 -> 4" in capsys.readouterr().err
    assert main([*argv, "train.max_steps=3", "--resume", "latest"]) == 0  # a longer run is the same run
    old_run = json.loads((out / "checkpoints" / "checkpoint-000001" / "trainer_state.json").read_text())["run_id"]
    assert old_run and _steps(out) == [1, 2, 3]

    card = (out / "lora" / "README.md").read_text()
    for text in ("library_name: diffusers", "- lora", "draft", "the Shapes model shipped with imgalign",
                 "`shapes-verifier`", "for 3 optimizer steps", "| loss |", "pipelines.load_lora"):  # fmt: skip
        assert text in card, text
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) & 0o044 == 0o044  # readable by others (umask 022)

    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--overwrite"]) == 2 and "notes.txt" in capsys.readouterr().err
    assert (out / "lora").is_dir()  # nothing removed
    (out / "notes.txt").unlink()
    assert main([*argv, "--overwrite"]) == 0
    assert _steps(out) == [1, 2]  # the old run's records are gone
    new_runs = {json.loads((c / "trainer_state.json").read_text())["run_id"] for c in list_checkpoints(out / "checkpoints")}
    assert old_run not in new_runs and len(new_runs) == 1  # no checkpoint of the old run is left to resume


# ----------------------------------------------------------------------------- the CLI's error boundary
def _fail_with(monkeypatch, exc: BaseException) -> None:
    import imgalign.commands.score as score

    def run(args):
        raise exc

    monkeypatch.setattr(score, "run", run)


SCORE = ["score", "--reward", "x", "--images", "y", "--out", "z.jsonl"]


@pytest.mark.parametrize(("exc", "code", "text"), [
    (KeyError("internal"), 1, "unexpected KeyError: 'internal' -- this is a bug in imgalign, not in your input; "
                              "run with --debug for the traceback"),
    (ZeroDivisionError("division by zero"), 1, "--debug"),
    (FileNotFoundError(2, "No such file or directory", "/data/x.png"), 2, "No such file or directory: /data/x.png"),
    (OSError(28, "No space left on device", "/runs/out/0003.png"), 2, "the disk is full"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 2, "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), 2, "out of memory"),
    (AssertionError("Torch not compiled with CUDA enabled"), 2, "--device cpu"),
    (ValueError("line one\nline two"), 2, "line one line two"),
])  # fmt: skip
def test_every_exception_is_one_line_and_bugs_say_so(exc, code, text, monkeypatch, capsys):
    _fail_with(monkeypatch, exc)
    assert main(SCORE) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("imgalign score: error: ") and text in err, err


def test_debug_shows_the_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyError("internal"))
    with pytest.raises(KeyError):
        main(["--debug", *SCORE])
    with pytest.raises(KeyError):
        main([*SCORE, "--debug"])  # anywhere on the line
    monkeypatch.setenv("IMGALIGN_DEBUG", "1")
    with pytest.raises(KeyError):
        main(SCORE)
    monkeypatch.setenv("IMGALIGN_DEBUG", "0")
    assert main(SCORE) == 1


def test_ctrl_c_exits_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(SCORE) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "imgalign score: interrupted (what was written is complete; --resume continues where supported)"]
