"""The newcomer's path and bad input: `imgalign --version`, and bad values refused where they enter.

Every bad value is one line on stderr that names the option, exit status 2, no traceback, and
it is refused before any model loads.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from imgalign import __version__
from imgalign.cli import main


# ----------------------------------------------------------------------------- --version
def test_version_prints_the_package_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"imgalign {__version__}"


def test_version_does_not_import_torch():
    code = ("import sys; from imgalign.cli import main; rc = main(['--version']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imgalign {__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["train", "--help"], ["sample", "--help"],
                                  ["eval", "--help"], ["sample", "--no-such-flag"]])  # fmt: skip
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (f"import sys; from imgalign.cli import main\ntry:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(0 if rc in (0, 2, None) else 1)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ----------------------------------------------------------------------------- bad values in sample / eval
SAMPLE = ["sample", "--pipeline", "shapes", "--prompt", "a red circle"]
EVAL = ["eval", "--pipeline", "shapes", "--prompt-set", "shapes-heldout", "--reward", "shapes-oracle"]

#: (command line, the option the one-line error must name)
BAD_VALUES = [
    (SAMPLE + ["--height", "0"], "--height"),
    (SAMPLE + ["--height", "-32"], "--height"),
    (SAMPLE + ["--width", "0"], "--width"),
    (SAMPLE + ["--guidance", "nan"], "--guidance"),
    (SAMPLE + ["--guidance", "inf"], "--guidance"),
    (SAMPLE + ["--guidance", "-1"], "--guidance"),
    (SAMPLE + ["--steps", "0"], "--steps"),
    (SAMPLE + ["--steps", "-5"], "--steps"),
    (SAMPLE + ["--num-images", "0"], "--num-images"),
    (SAMPLE + ["--batch-size", "0"], "--batch-size"),
    (SAMPLE + ["--sampler", "aig", "--aig-power", "nan"], "--aig-power"),
    (EVAL + ["--num-prompts", "0"], "--num-prompts"),
    (EVAL + ["--num-prompts", "-1"], "--num-prompts"),
    (EVAL + ["--images-per-prompt", "0"], "--images-per-prompt"),
    (EVAL + ["--height", "0"], "--height"),
    (EVAL + ["--width", "-8"], "--width"),
    (EVAL + ["--guidance", "nan"], "--guidance"),
    (EVAL + ["--guidance=-inf"], "--guidance"),
    (EVAL + ["--steps", "0"], "--steps"),
    (EVAL + ["--batch-size", "0"], "--batch-size"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad values are refused before any pipeline or reward loads."""
    import pipelines
    import rewards

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded before the bad value was refused: {args}")

    monkeypatch.setattr(pipelines, "load", refuse)
    monkeypatch.setattr(rewards, "load", refuse)


@pytest.mark.parametrize(("argv", "option"), BAD_VALUES, ids=[" ".join(a[len(SAMPLE if a[0] == "sample" else EVAL):])
                                                           for a, _ in BAD_VALUES])  # fmt: skip
def test_bad_value_is_one_line_exit_2(argv, option, tmp_path, capsys, no_model_loads):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert option in lines[0] and lines[0].startswith(f"imgalign {argv[0]}: error:")
    assert not out.exists()  # nothing written


# ============================================================================= the bad-input table
# Every command, many mistakes: exit 2, ONE line on stderr naming the culprit, no traceback, and
# whatever was in the output locations before is byte-identical afterwards (a fresh --out stays
# unwritten). Placeholders: {root} the fixture files below, {prev} a copy of a finished `sample`
# run (a "previous run" for every command), {rank} / {corrupt} previous training runs whose
# checkpoint has another lora.rank / does not load, {new} a fresh output path.

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

DPO = ["train", "dpo", "--config", "recipes/shapes_verifier_dpo.yaml"]  # resolved from any working directory
REWARD = ["train-reward", "--config", "recipes/reward.yaml"]
EDIT = ["sample", "--pipeline", "shapes-edit", "--instruction", "make the circle blue", "--steps", "2"]
S = ["sample", "--pipeline", "shapes", "--prompt", "a red circle", "--steps", "2"]
E = ["eval", "--pipeline", "shapes", "--prompt-set", "shapes-heldout", "--num-prompts", "2", "--steps", "2"]
SC = ["score", "--reward", "shapes-oracle", "--images", "{prev}"]
ER = ["eval-reward", "--reward", "shapes-preference", "--data", "{root}/pairs.jsonl"]
F = ["filter", "--data", "{root}/items.jsonl", "--reward", "shapes-oracle"]

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: --device cuda is valid")


def _xformers_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is None


#: (id, argv, the text the error line must contain); pytest.param marks where a case needs one.
TABLE = [
    # sample
    ("sample-out-not-empty", [*S, "--out", "{prev}"], "--out"),
    ("sample-out-is-a-file", [*S, "--out", "{root}/bytes.bin"], "--out"),
    ("sample-hub-id-offline", [*S, "--pipeline", "nosuch-org/nosuch-model", "--out", "{new}"], "hf download nosuch-org/nosuch-model"),
    ("sample-dir-not-a-pipeline", [*S, "--pipeline", "{root}/imgs", "--out", "{new}"], "model_index.json"),
    ("sample-corrupt-weights", [*S, "--pipeline", "{root}/sd15_corrupt", "--height", "32", "--width", "32", "--out", "{new}"],
     "diffusion_pytorch_model.safetensors"),
    pytest.param("sample-device-cuda-without-gpu", [*S, "--device", "cuda", "--out", "{new}"], "--device cuda",
                 marks=needs_no_gpu),
    ("sample-device-unknown", [*S, "--device", "tpu9", "--out", "{new}"], "--device"),
    ("sample-lora-without-weights", [*S, "--lora", "{root}/lora_empty", "--out", "{new}"], "--lora"),
    ("sample-lora-random-bytes", [*S, "--lora", "{root}/lora_rand", "--out", "{new}"], "--lora"),
    ("sample-lora-of-another-architecture", [*S, "--lora", "{root}/lora_sd15", "--out", "{new}"], "does not fit"),
    ("sample-edit-corrupt-image", [*EDIT, "--image", "{root}/corrupt.png", "--out", "{new}"], "--image"),
    ("sample-edit-missing-image", [*EDIT, "--image", "{root}/missing.png", "--out", "{new}"], "--image"),
    ("sample-edit-without-image", [*EDIT, "--out", "{new}"], "--image"),
    ("sample-prompt-file-missing", ["sample", "--pipeline", "shapes", "--prompts", "{root}/missing.txt", "--out", "{new}"],
     "missing.txt"),
    ("sample-resume-with-other-steps", ["sample", "--pipeline", "shapes", "--prompt", "a red circle", "--num-images", "2",
                                        "--steps", "3", "--resume", "--out", "{prev}"], "steps"),
    ("sample-resume-and-overwrite", [*S, "--resume", "--overwrite", "--out", "{prev}"], "--resume"),
    pytest.param("sample-attention-not-installed", [*S, "--attention", "xformers", "--out", "{new}"], "xformers",
                 marks=pytest.mark.skipif(not _xformers_missing(), reason="xformers is installed")),
    ("sample-steps-not-a-number", [*S, "--steps", "many", "--out", "{new}"], "--steps"),
    # score
    ("score-images-missing", ["score", "--reward", "shapes-oracle", "--images", "{root}/nowhere", "--out", "{new}.jsonl"],
     "--images"),
    ("score-unknown-reward", ["score", "--reward", "nosuch-reward", "--images", "{prev}", "--out", "{new}.jsonl"],
     "nosuch-reward"),
    ("score-checkpoint-random-bytes", ["score", "--reward", "shapes-clip", "--checkpoint", "{root}/bytes.bin",
                                       "--images", "{prev}", "--out", "{new}.jsonl"], "--checkpoint"),
    ("score-out-exists", [*SC, "--out", "{prev}/samples.jsonl"], "--out"),
    ("score-out-is-a-directory", [*SC, "--out", "{prev}"], "--out"),
    ("score-prompts-bad-json", [*SC, "--prompts", "{root}/bad.json", "--out", "{new}.jsonl"], "--prompts"),
    ("score-batch-size-zero", [*SC, "--batch-size", "0", "--out", "{new}.jsonl"], "--batch-size"),
    ("score-reward-weight-nan", ["score", "--reward", "shapes-oracle=nan,shapes-clip=1", "--images", "{prev}",
                                 "--out", "{new}.jsonl"], "not a finite number"),
    # eval
    ("eval-unknown-prompt-set", ["eval", "--pipeline", "shapes", "--prompt-set", "nosuch-set", "--reward", "shapes-oracle",
                                 "--out", "{new}"], "nosuch-set"),
    ("eval-unknown-reward", [*E, "--reward", "nosuch-reward", "--out", "{new}"], "nosuch-reward"),
    ("eval-out-not-empty", [*E, "--reward", "shapes-oracle", "--out", "{prev}"], "--out"),
    ("eval-lora-random-bytes", [*E, "--reward", "shapes-oracle", "--lora", "{root}/lora_rand", "--out", "{new}"], "--lora"),
    ("eval-device-unknown", [*E, "--reward", "shapes-oracle", "--device", "tpu9", "--out", "{new}"], "--device"),
    # train
    ("train-malformed-yaml", ["train", "dpo", "--config", "{root}/bad.yaml"], "bad.yaml"),
    ("train-config-missing", ["train", "dpo", "--config", "{root}/missing.yaml"], "missing.yaml"),
    ("train-unknown-key", [*DPO, "train.max_step=3", "output_dir={new}"], "train.max_steps"),
    ("train-unknown-method", ["train", "nosuch-method", "--config", "{root}/bad.yaml"], "nosuch-method"),
    ("train-output-dir-not-empty", [*DPO, "output_dir={prev}"], "output_dir"),
    ("train-resume-not-a-checkpoint", [*DPO, "output_dir={new}", "--resume", "{root}/imgs"], "imgs"),
    ("train-resume-changed-lora-rank", [*DPO, "output_dir={rank}", "--resume", "latest"], "lora.rank: 4 -> 8"),
    ("train-resume-corrupt-checkpoint", [*DPO, "output_dir={corrupt}", "--resume", "latest"], "checkpoint-000001"),
    ("train-resume-and-overwrite", [*DPO, "output_dir={corrupt}", "--resume", "latest", "--overwrite"], "--resume"),
    # train-reward
    ("train-reward-data-missing", [*REWARD, "data.train={root}/nope.jsonl", "output_dir={new}"], "nope.jsonl"),
    ("train-reward-bad-label", [*REWARD, "data.train={root}/pairs_badlabel.jsonl", "data.val=null", "output_dir={new}"],
     "unknown label 'C'"),
    ("train-reward-unknown-loss", [*REWARD, "loss.kind=nosuch", "output_dir={new}"], "loss.kind"),
    ("train-reward-output-dir-not-empty", [*REWARD, "data.train={root}/pairs.jsonl", "output_dir={prev}"], "output_dir"),
    # eval-reward
    ("eval-reward-data-missing", ["eval-reward", "--reward", "shapes-preference", "--data", "{root}/nope.jsonl",
                                 "--out", "{new}"], "nope.jsonl"),
    ("eval-reward-malformed-jsonl", ["eval-reward", "--reward", "shapes-preference", "--data",
                                     "{root}/pairs_malformed.jsonl", "--out", "{new}"], "pairs_malformed.jsonl"),
    ("eval-reward-unknown-label", ["eval-reward", "--reward", "shapes-preference", "--data", "{root}/pairs_badlabel.jsonl",
                                   "--out", "{new}"], "record 1"),
    ("eval-reward-unknown-reward", ["eval-reward", "--reward", "nosuch-reward", "--data", "{root}/pairs.jsonl",
                                    "--out", "{new}"], "nosuch-reward"),
    ("eval-reward-out-not-empty", [*ER, "--out", "{prev}"], "--out"),
    ("eval-reward-temperature-zero", [*ER, "--temperature", "0", "--out", "{new}"], "--temperature"),
    # filter
    ("filter-data-missing", ["filter", "--data", "{root}/nope.jsonl", "--reward", "shapes-oracle", "--threshold", "0",
                             "--out", "{new}"], "--data"),
    ("filter-top-fraction-above-one", [*F, "--top-fraction", "2", "--out", "{new}"], "--top-fraction"),
    ("filter-threshold-nan", [*F, "--threshold", "nan", "--out", "{new}"], "--threshold"),
    ("filter-reward-weight-inf", ["filter", "--data", "{root}/items.jsonl", "--reward", "shapes-oracle=inf,shapes-clip=1",
                                  "--threshold", "0", "--out", "{new}"], "not a finite number"),
    ("filter-out-not-empty", [*F, "--threshold", "0", "--out", "{prev}"], "--out"),
    ("filter-every-item-fails", ["filter", "--data", "{root}/items_unreadable.jsonl", "--reward", "shapes-oracle",
                                 "--threshold", "0", "--out", "{new}"], "none of the 2 item(s) could be scored"),
    # demo
    ("demo-unknown-algo", ["demo", "--algo", "magic", "--out", "{new}"], "magic"),
    ("demo-one-prompt", ["demo", "--num-prompts", "1", "--out", "{new}"], "--num-prompts"),
    ("demo-train-steps-zero", ["demo", "--algo", "draft", "--train-steps", "0", "--out", "{new}"], "--train-steps"),
    ("demo-out-not-empty", ["demo", "--out", "{prev}"], "--out"),
]
#: Cases whose command legitimately writes its (new) output before it fails: filter reports every item.
WRITES_NEW_OUTPUT = {"filter-every-item-fails"}


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


def test_the_table_covers_every_command():
    argvs = [(c.values if hasattr(c, "values") else c)[1] for c in TABLE]
    commands = {argv[0] for argv in argvs}
    assert commands >= {"sample", "score", "eval", "train", "train-reward", "eval-reward", "filter", "demo"}
    assert len(TABLE) >= 30


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """The files the table's mistakes are made of, and previous runs to protect (built once)."""
    import pipelines
    from imgalign.images import save_png
    from imgalign.train import load_method_config
    from imgalign.train.config import to_yaml
    from pipelines.architectures import build_pipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad")
    (root / "imgs").mkdir()
    save_png(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), root / "imgs" / "a.png")
    (root / "bytes.bin").write_bytes(os.urandom(300))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "bad.yaml").write_text("method: dpo\n  pipeline: [shapes\n")
    (root / "bad.json").write_text("{'a.png': 'single quotes are not JSON'")
    (root / "lora_empty").mkdir()
    (root / "lora_rand").mkdir()
    (root / "lora_rand" / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(500))
    sd15 = build_pipeline("sd15", "tiny", seed=0)
    sd15.save_pretrained(root / "sd15_corrupt")
    next((root / "sd15_corrupt" / "unet").glob("*.safetensors")).write_bytes(os.urandom(1000))
    adapter = pipelines.load(sd15)
    pipelines.add_lora(adapter, rank=2)
    pipelines.save_lora(adapter, root / "lora_sd15")  # a real LoRA, for another architecture
    pair = {"image_a": "imgs/a.png", "image_b": "imgs/a.png", "prompt": "a red circle on a white background"}
    (root / "pairs.jsonl").write_text(json.dumps({**pair, "label": "A"}) + "\n" + json.dumps({**pair, "label": 1}) + "\n")
    (root / "pairs_badlabel.jsonl").write_text(json.dumps({**pair, "label": "C"}) + "\n")
    (root / "pairs_malformed.jsonl").write_text('{"image_a": "imgs/a.png", \n')
    (root / "items.jsonl").write_text(json.dumps({"image": "imgs/a.png", "prompt": pair["prompt"]}) + "\n")
    (root / "items_unreadable.jsonl").write_text("".join(json.dumps({"image": name, "prompt": pair["prompt"]}) + "\n"
                                                         for name in ("corrupt.png", "imgs/missing.png")))  # fmt: skip

    # previous runs: a finished sample run, and two training runs that cannot be resumed
    assert main(["sample", "--pipeline", "shapes", "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                 "--out", str(root / "prev")]) == 0  # fmt: skip
    for name, rank in (("rank", 4), ("corrupt", 8)):
        run = root / name
        checkpoint = run / "checkpoints" / "checkpoint-000001"
        checkpoint.mkdir(parents=True)
        cfg = load_method_config("dpo", "recipes/shapes_verifier_dpo.yaml", [f"output_dir={run}", f"lora.rank={rank}"])
        (run / "config.yaml").write_text(to_yaml(cfg))
        (checkpoint / "config.yaml").write_text(to_yaml(cfg))
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
        (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "samples_seen": 8}))
        save_file({"w": torch.zeros(2)}, str(checkpoint / "extra.safetensors"))
        (checkpoint / "trainable.safetensors").write_bytes(os.urandom(400))  # truncated / corrupt
    return {"root": root, "prev": root / "prev", "rank": root / "rank", "corrupt": root / "corrupt"}


def _digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (relative name -> sha256 of its bytes)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.mark.parametrize(("case_id", "argv", "culprit"), TABLE, ids=[_case_id(c) for c in TABLE])
def test_bad_input_table(case_id, argv, culprit, bad_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # recipes and the shipped models resolve from any working directory
    places = {"root": str(bad_inputs["root"]), "new": str(tmp_path / "new")}
    for name in ("prev", "rank", "corrupt"):  # each case gets its own copy of the previous runs
        shutil.copytree(bad_inputs[name], tmp_path / name)
        places[name] = str(tmp_path / name)
    protected = {name: _digest(tmp_path / name) for name in ("prev", "rank", "corrupt")}
    protected["root"] = _digest(bad_inputs["root"])
    line = [arg.format(**places) for arg in argv]
    capsys.readouterr()

    try:
        code = main(line)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip()]
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"imgalign {line[0]}: error:"), lines[0]
    assert culprit in lines[0], lines[0]
    for name, digest in protected.items():
        where = bad_inputs["root"] if name == "root" else tmp_path / name
        assert _digest(where) == digest, f"{name} changed"
    if case_id not in WRITES_NEW_OUTPUT:
        for fresh in (tmp_path / "new", tmp_path / "new.jsonl"):
            assert not fresh.exists() or (fresh.is_dir() and not any(fresh.iterdir())), f"{fresh} was written"
