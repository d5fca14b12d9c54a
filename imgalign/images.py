"""Image files <-> tensors: float [3,H,W] / [B,3,H,W] in [0, 1], the rewards' and adapters' layout.

Reading goes through the toolkit's one decoder, :func:`rewards.load_image` (every PIL mode,
16-bit, palette and alpha, EXIF orientation; a one-line refusal otherwise). Writing is
atomic: a PNG appears complete or not at all, so an interrupted run never leaves a 0-byte
or half-written image where a resumed run (or a user) would read it.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def load_image(path: str | os.PathLike, *, expected_side: int | None = None) -> torch.Tensor:
    """An image file as float [1,3,H,W] in [0,1] (RGB; alpha composited on white; see :mod:`rewards.images`).

    ``expected_side``: the model's input side; a much smaller image is warned about.
    """
    import rewards

    image = rewards.load_image(path)
    rewards.images.warn_if_small(image, expected_side, name=str(path))
    return image


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] or [B,H,W,3] -> float [3,H,W] or [B,3,H,W] in [0,1]."""
    return torch.from_numpy(array).movedim(-1, -3).float() / 255


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] or [B,3,H,W] in [0,1] -> uint8 [H,W,3] or [B,H,W,3], rounding like diffusers' ``numpy_to_pil``."""
    return (image.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy() * 255).round().astype(np.uint8)


def save_png(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> None:
    """Save float [3,H,W] in [0,1], or an already-quantised uint8 [H,W,3] array, as a PNG (atomically)."""
    from PIL import Image

    _save_atomic(Image.fromarray(image if isinstance(image, np.ndarray) else to_uint8(image)), Path(path))


def _save_atomic(picture, path: Path) -> None:
    """PIL image -> ``path`` via a temporary sibling and ``os.replace`` (ordinary permissions: umask)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_grid(
    images: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    ncols: int | None = None,
    *,
    captions: Sequence[str] | None = None,
    scores: Sequence[str | float | dict[str, float] | None] | None = None,
) -> None:
    """Save images as one grid PNG (near-square by default), 2-pixel white gutters.

    With ``captions`` (one per image: the prompt) and/or ``scores`` (one per image: a number,
    ``{reward: value}`` or a ready string) each cell gets a caption band below it, so a grid
    says what was asked and how it was judged. Cells are enlarged by an integer factor (nearest
    neighbour) to at least 128 px wide so that the text fits and 32-px images stay legible.
    """
    if len(images) == 0:
        return
    stack = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    ncols = min(ncols or math.ceil(math.sqrt(len(stack))), len(stack))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if captions is None and scores is None:
        from torchvision.utils import make_grid

        grid = make_grid(stack.float().cpu(), nrow=ncols, padding=2, pad_value=1.0)
        save_png(grid, path)
        return
    _save_captioned_grid(stack, Path(path), ncols, captions, scores)


def _score_lines(score: str | float | dict[str, float] | None) -> list[str]:
    """One line per reward (``name: value``), or ``score: value`` for a bare number."""
    if score is None:
        return []
    if isinstance(score, str):
        return [score]
    if isinstance(score, dict):
        return [f"{name}: {value:.3g}" for name, value in score.items() if value is not None]
    return [f"score: {float(score):.3g}"]


def _save_captioned_grid(stack: torch.Tensor, path: Path, ncols: int, captions, scores) -> None:
    from PIL import Image, ImageDraw, ImageFont

    n, _, height, width = stack.shape
    zoom = max(1, math.ceil(128 / width))
    cell_w, cell_h = width * zoom, height * zoom
    font = ImageFont.load_default(size=10)
    line_h = 12
    chars = max(8, int(cell_w / max(1.0, font.getlength("abcdefghij") / 10)))  # characters per caption line

    def lines(i: int) -> list[str]:
        caption = textwrap.wrap(captions[i], chars) if captions is not None and captions[i] else []
        if len(caption) > 3:  # long prompts: three lines and an ellipsis
            caption = caption[:2] + [textwrap.shorten(" ".join(caption[2:]), chars, placeholder="...")]
        score = _score_lines(scores[i]) if scores is not None else []
        return caption + [textwrap.shorten(line, chars, placeholder="...") for line in score[:4]]

    texts = [lines(i) for i in range(n)]
    band = line_h * max(len(t) for t in texts) + 4
    nrows = math.ceil(n / ncols)
    pad = 2
    canvas = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + band + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pictures = to_uint8(stack)
    for i in range(n):
        row, col = divmod(i, ncols)
        x, y = pad + col * (cell_w + pad), pad + row * (cell_h + band + pad)
        canvas.paste(Image.fromarray(pictures[i]).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        for k, text in enumerate(texts[i]):
            draw.text((x + 1, y + cell_h + 2 + k * line_h), text, fill=(0, 0, 0), font=font)
    _save_atomic(canvas, path)
