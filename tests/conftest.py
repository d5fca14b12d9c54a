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
