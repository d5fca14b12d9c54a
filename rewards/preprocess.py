"""Differentiable tensor preprocessing shared by the reward models.

All functions take ``[B,C,H,W]`` float tensors (values in ``[0,1]`` before
:func:`normalize`) and are differentiable with respect to them.

Resampling: :func:`resize` uses ``F.interpolate(..., antialias=True)`` by default. For
bicubic that is PyTorch's anti-aliased kernel with ``a = -0.5``, the same separable kernel
PIL uses for ``Image.BICUBIC`` and the one torchvision (>= 0.17) uses for tensors, so it
tracks both PIL and torchvision pipelines. PIL also clips the overshoot of the bicubic
kernel to the 8-bit range; ``clamp=True`` does the same (use it where the reference
resizes PIL images, not where it resizes tensors, like HPSv2). What remains against
torchvision-on-PIL is PIL's 8-bit storage between its two separable passes; the tolerance
on photographs is asserted in ``tests/test_rewards_clip_family.py``. ``antialias=False`` gives
the plain ``a = -0.75`` kernel that torchvision < 0.17 used for tensors.

Sizes follow the references exactly:

* shortest-side resize: ``short = size``, ``long = int(size * long / short)`` (torchvision
  ``Resize(int)`` and transformers ``shortest_edge`` compute it the same way);
* center crop: torchvision rounds the offset with ``int(round((h - c) / 2))``, transformers'
  image processors floor it with ``(h - c) // 2``; pass ``offset="round"`` or ``"floor"``;
* longest-side resize + pad (open_clip ``ResizeMaxSize`` as used by HPSv2): new size
  ``round(dim * scale)``, pad left/top ``p // 2`` and right/bottom ``p - p // 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "center_crop",
    "normalize",
    "resize",
    "resize_longest_and_pad",
    "resize_shortest",
    "resize_shortest_and_center_crop",
]

#: OpenAI CLIP constants (open_clip ``OPENAI_DATASET_MEAN/STD``, CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ImageNet constants (torchvision / timm ``IMAGENET_DEFAULT_MEAN/STD``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODES = {"bicubic", "bilinear", "nearest", "area", "nearest-exact"}


def resize(x: Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool = True,
           clamp: bool = False) -> Tensor:
    """Resize ``[B,C,H,W]`` to ``size = (h, w)``; a no-op when the size already matches.

    ``clamp=True`` clips the bicubic overshoot to ``[0,1]`` as PIL does (it stores the
    result in 8 bits); use it when the reference pipeline resizes PIL images.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown resize mode {mode!r}; use one of {sorted(_MODES)}")
    h, w = int(size[0]), int(size[1])
    if (x.shape[-2], x.shape[-1]) == (h, w):
        return x
    if mode in ("bicubic", "bilinear"):
        x = F.interpolate(x, size=(h, w), mode=mode, align_corners=False, antialias=antialias)
        return x.clamp(0, 1) if clamp else x
    return F.interpolate(x, size=(h, w), mode=mode)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of a shortest-side resize to ``size`` (torchvision/transformers rule)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def resize_shortest(x: Tensor, size: int, mode: str = "bicubic", antialias: bool = True,
                    clamp: bool = False) -> Tensor:
    return resize(x, shortest_side_size(x.shape[-2], x.shape[-1], size), mode, antialias, clamp)


def center_crop(x: Tensor, size: int | tuple[int, int], offset: str = "round") -> Tensor:
    """Center crop to ``size``; pads with zeros first if the image is smaller (torchvision)."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[-2:]
    if offset == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    elif offset == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        raise ValueError(f"offset must be 'round' (torchvision) or 'floor' (transformers), got {offset!r}")
    return x[..., top : top + ch, left : left + cw]


def resize_shortest_and_center_crop(
    x: Tensor,
    resize_to: int,
    crop_to: int | None = None,
    mode: str = "bicubic",
    antialias: bool = True,
    offset: str = "round",
    clamp: bool = False,
) -> Tensor:
    """``Resize(resize_to)`` on the shortest side, then ``CenterCrop(crop_to or resize_to)``."""
    x = resize_shortest(x, resize_to, mode, antialias, clamp)
    return center_crop(x, crop_to or resize_to, offset)


def resize_longest_and_pad(
    x: Tensor, size: int, mode: str = "bicubic", antialias: bool = True, fill: float = 0.0, clamp: bool = False
) -> Tensor:
    """open_clip/HPSv2 ``ResizeMaxSize``: longest side to ``size`` then pad to a square.

    As in the reference, nothing happens when the longest side already equals ``size``
    (scale == 1): such an image is *not* padded, so a non-square one stays non-square.
    """
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = resize(x, (nh, nw), mode, antialias, clamp)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def normalize(x: Tensor, mean, std) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
