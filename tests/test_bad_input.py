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
