"""Training data whose position is a pure function of the step: prompts and image/caption folders.

Every micro-batch is addressed by ``(micro_step, process_index)``: the global sample
position is ``(micro_step * num_processes + process_index) * batch_size``, and the dataset
is walked through one seeded permutation per epoch. So there is no iterator state to save:
resuming at step k draws exactly the batches the uninterrupted run drew, and every process
sees different samples.

Image/caption folders (real images for ImageReFL, source images + instructions for edit
models, caption/image pairs for a pre-training loss) come in either of two layouts:

* image files with a same-name ``.txt`` caption (``cat.png`` + ``cat.txt``);
* a ``metadata.jsonl`` with ``{"file_name": ..., "text": ...}`` per line (the diffusers /
  datasets ``imagefolder`` convention).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompts(source: Sequence[str] | str | None) -> list[str]:
    """A list of prompts, a named set (``shapes-train``), or a text file with one per line."""
    from imgalign.prompt_sets import PROMPT_SETS, prompt_set

    if source is None:
        return []
    if isinstance(source, str) and source in PROMPT_SETS:
        return prompt_set(source)
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path} (give a list or a text file)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file is empty: {path}")
        return prompts
    prompts = [str(p) for p in source if str(p).strip()]
    if not prompts:
        raise ValueError("data.prompts is an empty list")
    return prompts


@dataclass
class ImageCaption:
    path: Path
    text: str


def read_image_folder(folder: str | Path) -> list[ImageCaption]:
    """Pairs from ``metadata.jsonl`` if present, else from image files with same-name ``.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    metadata = folder / "metadata.jsonl"
    items: list[ImageCaption] = []
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "file_name" not in record or "text" not in record:
                raise ValueError(f"{metadata}:{n}: each line needs 'file_name' and 'text'")
            path = folder / record["file_name"]
            if not path.is_file():
                raise FileNotFoundError(f"{metadata}:{n}: image not found: {path}")
            items.append(ImageCaption(path, str(record["text"])))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = path.with_suffix(".txt")
            if not caption.is_file():
                raise FileNotFoundError(f"no caption for {path.name}: add {caption.name} or a metadata.jsonl")
            items.append(ImageCaption(path, caption.read_text().strip()))
    if not items:
        raise ValueError(f"{folder} has no images (image files + .txt captions, or metadata.jsonl)")
    return items


def write_image_folder(folder: str | Path, images: Sequence, texts: Sequence[str],
                       extra: Sequence[dict] | None = None) -> Path:  # fmt: skip
    """Write the ``metadata.jsonl`` layout :func:`read_image_folder` reads: ``0000.png``, ... and
    one ``{"file_name", "text", **extra[i]}`` line per image (float [3,H,W] or uint8 [H,W,3])."""
    from imgalign.images import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra or [{} for _ in texts]
    with (folder / "metadata.jsonl").open("w") as meta:
        for i, (image, text, more) in enumerate(zip(images, texts, extra, strict=True)):
            save_png(image, folder / f"{i:04d}.png")
            meta.write(json.dumps({"file_name": f"{i:04d}.png", "text": text, **more}) + "\n")
    return folder


def load_resized(path: Path, height: int, width: int) -> torch.Tensor:
    """An image as float [3,H,W] in [0,1], resized (shorter side) and center-cropped."""
    from PIL import Image

    import rewards

    with Image.open(path) as image:
        image = rewards.images.to_rgb(image, str(path))  # every PIL mode (16-bit, palette, alpha, EXIF)
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


class StepIndexedSampler:
    """Dataset indices for ``(micro_step, process_index)``: one seeded permutation per epoch."""

    def __init__(self, size: int, batch_size: int, num_processes: int = 1, seed: int = 0, shuffle: bool = True):
        if size < 1:
            raise ValueError("empty dataset")
        self.size, self.batch_size, self.num_processes = size, batch_size, num_processes
        self.seed, self.shuffle = seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            self._perms = {epoch: rng.permutation(self.size) if self.shuffle else np.arange(self.size)}
        return self._perms[epoch]

    def indices(self, micro_step: int, process_index: int = 0) -> list[int]:
        start = (micro_step * self.num_processes + process_index) * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            out.append(int(self._permutation(epoch)[offset]))
        return out


@dataclass
class Batch:
    """What one micro-batch gives the trainer: prompts, and images when the data has them."""

    prompts: list[str]
    images: torch.Tensor | None = None  # [B,3,H,W] in [0,1]


class PromptData:
    def __init__(self, prompts: list[str], sampler: StepIndexedSampler):
        self.prompts, self.sampler = prompts, sampler

    def batch(self, micro_step: int, process_index: int = 0) -> Batch:
        return Batch([self.prompts[i] for i in self.sampler.indices(micro_step, process_index)])


class ImageCaptionData:
    def __init__(self, items: list[ImageCaption], sampler: StepIndexedSampler, height: int, width: int):
        self.items, self.sampler, self.height, self.width = items, sampler, height, width

    @property
    def prompts(self) -> list[str]:
        return [item.text for item in self.items]

    def batch(self, micro_step: int, process_index: int = 0) -> Batch:
        chosen = [self.items[i] for i in self.sampler.indices(micro_step, process_index)]
        images = torch.stack([load_resized(item.path, self.height, self.width) for item in chosen])
        return Batch([item.text for item in chosen], images)


__all__ = [
    "Batch",
    "ImageCaption",
    "ImageCaptionData",
    "PromptData",
    "StepIndexedSampler",
    "load_resized",
    "read_image_folder",
    "read_prompts",
]
