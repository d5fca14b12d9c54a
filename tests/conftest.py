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
    for family in ("sd15", "sdxl", "sd3", "instruct-pix2pix"):
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
