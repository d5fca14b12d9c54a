"""JPEG (in)compressibility: DDPO's rule-based rewards (Black et al. 2023, §5.1).

The reward is the negative size of the image saved as a JPEG at quality 95, in kilobytes
(``jpeg-compressibility``), or the size itself (``jpeg-incompressibility``), exactly as
kvablack/ddpo-pytorch's ``ddpo_pytorch/rewards.py`` computes it (8-bit RGB, PIL, quality 95,
size / 1000). No network, no weights, no gradient: the rule-based reward a policy-gradient
method (GRPO, DDPO) optimises and a reward-gradient method cannot.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardInfo


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image [B,3,H,W] in [0,1] saved as JPEG at ``quality``."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """``-kB`` (compressibility) or ``+kB`` (incompressibility) of the image as a quality-95 JPEG."""

    def __init__(self, *, incompressible: bool = False, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.sign, self.quality = (1.0 if incompressible else -1.0), quality
        name = "jpeg-incompressibility" if incompressible else "jpeg-compressibility"
        self.info = RewardInfo(name=name, inputs=("images",), differentiable=False,
                               source="Black et al. 2023 (DDPO), kvablack/ddpo-pytorch rewards.py")  # fmt: skip

    def _score(self, images: torch.Tensor, prompts=None, **_) -> torch.Tensor:
        return self.sign * jpeg_kilobytes(images, self.quality)


def jpeg_compressibility(**options) -> JpegCompressibility:
    return JpegCompressibility(incompressible=False, **options)


def jpeg_incompressibility(**options) -> JpegCompressibility:
    return JpegCompressibility(incompressible=True, **options)
