"""Keep every test offline and light on the shared 2-core machines."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> str:
    """A tiny SD1.5 pipeline (random weights, real architecture) saved as a diffusers directory."""
    from pipelines.architectures import build_pipeline

    path = tmp_path_factory.mktemp("pipe") / "sd15"
    build_pipeline("sd15", "tiny", seed=0).save_pretrained(path)
    return str(path)


#: The prompts of the tiny training runs, and the captions of ``image_folder``.
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
#: The image side of the tiny training runs (pixels).
SIZE = 32


@pytest.fixture(scope="module")
def pipe_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny pipelines (random weights, real architectures) of the recipe families, saved as diffusers directories."""
    from pipelines.architectures import build_pipeline

    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for family in ("sd15", "sdxl", "sd3", "flux", "instruct-pix2pix"):
        build_pipeline(family, "tiny", seed=0).save_pretrained(root / family)
        out[family] = str(root / family)
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three 'real' images with same-name captions (ImageReFL data / edit sources)."""
    from imgalign.images import save_png

    folder = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(7)
    for i, caption in enumerate(PROMPTS):
        save_png(torch.rand(3, SIZE, SIZE, generator=g), folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


#: The launch configuration of the 2-process CPU tests (the README's, as shipped).
CPU_2PROC_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "accelerate",
                                "cpu_2proc.yaml")  # fmt: skip


def read_metrics(output_dir) -> list[dict]:
    """A training run's ``metrics.jsonl``, one dict per line."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def validation_gain(metrics: list[dict], step: int) -> tuple[float, float]:
    """(validation reward before training, the last one logged at ``step``): fixed seeds, so a rise is learning."""
    before = next(m["val_reward_mean"] for m in metrics if m["step"] == 0)
    after = [m["val_reward_mean"] for m in metrics if m["step"] == step and "val_reward_mean" in m][-1]
    return before, after


def launch_two_cpu_processes(script, args: list[str], timeout: int = 300):
    """``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml`` on ``script``: two CPU workers (gloo).

    accelerate 1.15's ``--cpu`` with ``--num_processes 2`` starts a single process unless an
    mpirun hostfile is configured; its MULTI_GPU launcher on a machine with no visible GPU
    starts two torchrun workers that accelerate runs as MULTI_CPU.
    """
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", CPU_2PROC_CONFIG, str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_errors(main, method: str, pipeline: str, reward: str, cases: dict[str, str], capsys) -> None:
    """``imgalign train METHOD --print-config ... OVERRIDE`` exits 2 with MESSAGE on stderr, for every case."""
    for override, message in cases.items():
        assert main(["train", method, "--print-config", f"pipeline={pipeline}", f"reward={reward}", override]) == 2, override
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
