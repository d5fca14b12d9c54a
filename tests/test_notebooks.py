"""The research notebooks run top to bottom, offline, on a CPU, and each shows a figure.

The notebooks are kept as jupytext percent-format scripts (``notebooks/NN_name.py``): the
plain-text file is the source of truth, so diffs stay readable and no outputs are committed.
Here each is converted with jupytext and executed by nbclient in a kernel that runs this
interpreter (a kernelspec written for the test, first on ``JUPYTER_PATH``), so the notebook sees
exactly the installed packages the tests see, whatever kernels the machine has registered.
A cell that raises fails the test with the cell's traceback; a notebook that shows no figure
fails too. Outputs go to a temporary directory (``IMGALIGN_NOTEBOOK_OUT``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
KERNEL = "imgalign-test-python"
#: Per cell, in seconds: a stall guard against a loaded CI machine, not a speed test (each notebook
#: computes for well under a minute on two idle cores).
TIMEOUT = 600
GPU_FLAG = re.compile(r"^RUN_ON_GPU = False\s*$", re.M)


def _read(path: Path):
    try:
        import jupytext
    except ImportError as err:  # the Makefile installs the extra; say how when it is missing
        raise RuntimeError(f"{err}: install the notebook extra with pip install -e '.[notebooks]'") from err
    return jupytext.read(path)


def test_every_issue_notebook_exists():
    names = [p.stem for p in NOTEBOOKS]
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06"], names
    assert not list(NOTEBOOK_DIR.glob("*.ipynb")), "commit the jupytext .py file, not the .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    """Prose first, the GPU cell last and off by default, explained by the markdown before it."""
    nb = _read(path)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), "start with a title cell"
    code = [c for c in cells if c.cell_type == "code"]
    assert GPU_FLAG.search(code[-1].source), "the last code cell starts from RUN_ON_GPU = False"
    assert "if RUN_ON_GPU:" in code[-1].source
    last_markdown = [c for c in cells[: cells.index(code[-1])] if c.cell_type == "markdown"][-1]
    assert "RUN_ON_GPU" in last_markdown.source, "the text before the GPU cell explains the flag"
    assert all(not GPU_FLAG.search(c.source) for c in code[:-1])
    assert "tiny" in " ".join(c.source for c in cells if c.cell_type == "markdown").lower(), \
        "the prose says that the numbers come from a tiny run"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel running this interpreter for all the notebooks, found before any user- or
    system-wide 'python3' kernelspec.

    Sharing it keeps the suite inside CI's budget: importing torch, diffusers and transformers
    costs 10-20 s per process on a loaded two-core machine, more than most notebooks compute.
    Each notebook starts with ``%reset -f`` (an empty namespace: a name one notebook forgot to
    define or import fails as it would in a fresh kernel); only the module cache is shared.
    """
    from jupyter_client.manager import KernelManager

    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "imgalign tests", "language": "python"}))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(root))
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        env.delenv("MPLBACKEND", raising=False)  # the inline backend: figures become cell outputs
        manager = KernelManager(kernel_name=KERNEL)
        manager.start_kernel(cwd=str(NOTEBOOK_DIR))
    yield manager
    manager.shutdown_kernel(now=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = _read(path)
    fresh = nbformat.v4.new_code_cell(
        "%reset -f\nimport os\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')\n"
        f"os.chdir({str(NOTEBOOK_DIR)!r})\nos.environ['IMGALIGN_NOTEBOOK_OUT'] = {str(tmp_path)!r}\ndel os, matplotlib")
    nb.cells.insert(0, fresh)
    start = time.perf_counter()
    NotebookClient(nb, km=kernel, timeout=TIMEOUT).execute()
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{path.name} shows no plot or image"
    print(f"{path.name}: {seconds:.0f} s, {len(figures)} figures")
