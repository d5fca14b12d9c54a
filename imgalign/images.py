"""Image files <-> tensors: float [3,H,W] / [B,3,H,W] in [0, 1], the rewards' and adapters' layout."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as float [1,3,H,W] in [0,1] (RGB; alpha dropped)."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return from_uint8(array.copy())[None]


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] or [B,H,W,3] -> float [3,H,W] or [B,3,H,W] in [0,1]."""
    return torch.from_numpy(array).movedim(-1, -3).float() / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] or [B,3,H,W] in [0,1] -> uint8 [H,W,3] or [B,H,W,3], rounding like diffusers' ``numpy_to_pil``."""
    return (image.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy() * 255).round().astype(np.uint8)


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save float [3,H,W] in [0,1], or an already-quantised uint8 [H,W,3] array, as a PNG."""
    from PIL import Image

    Image.fromarray(image if isinstance(image, np.ndarray) else to_uint8(image)).save(path)


def save_grid(images: Sequence[torch.Tensor] | torch.Tensor, path: str | os.PathLike, ncols: int | None = None) -> None:
    """Save images as one grid PNG (near-square by default), 2-pixel white gutters."""
    from torchvision.utils import make_grid

    if len(images) == 0:
        return
    stack = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    ncols = ncols or math.ceil(math.sqrt(len(stack)))
    grid = make_grid(stack.float().cpu(), nrow=ncols, padding=2, pad_value=1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
