"""PIL images given to a pipeline (an edit model's source image) -> RGB, every mode correctly.

The same conversion as :func:`rewards.images.to_rgb_array` (``pipelines`` may not import
``rewards``; ``tests/test_images.py`` keeps the two equal): EXIF orientation applied, 16-bit
greyscale scaled by 65535, alpha composited on white, ``CMYK``/``YCbCr``/``P`` through PIL,
``LAB`` through ``PIL.ImageCms``,
anything PIL cannot convert refused with a one-line ``ValueError``. See ``rewards/images.py``
for why ``image.convert("RGB")`` is not enough.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["UnreadableImageError", "to_rgb_array"]


#: Modes handled by scaling 16/32-bit integers to [0, 1].
_INTEGER_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(ValueError):
    """A PIL image that cannot be converted to RGB; the message names it."""


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """float RGBA [H,W,4] in [0,1] -> RGB [H,W,3] over a white background."""
    alpha = rgba[..., 3:4]
    return rgba[..., :3] * alpha + (1.0 - alpha)


def to_rgb_array(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image as float32 RGB ``[H, W, 3]`` in [0, 1] (see the module docstring for each mode)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # a camera's rotation flag, applied to the pixels
    mode = image.mode
    if mode in _INTEGER_GREY:
        grey = np.asarray(image).astype(np.float64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise UnreadableImageError(f"{name}: 32-bit greyscale values outside 0..65535 (mode {mode}); "
                                       "save it as an 8- or 16-bit PNG")  # fmt: skip
        return np.repeat((grey / 65535.0)[..., None], 3, axis=-1).astype(np.float32)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if grey.size and (not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1):
            raise UnreadableImageError(f"{name}: floating-point image with values outside [0, 1] (mode F); "
                                       "save it as an 8- or 16-bit PNG")  # fmt: skip
        return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply through PIL's own conversion
        mode = "RGBA" if mode == "RGBa" else "LA"
        image = image.convert(mode)
    if mode in _ALPHA:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return _composite_on_white(rgba).astype(np.float32)
    if mode == "LAB":  # PIL's plain convert reads CIELAB bytes as if they were RGB; colour-manage it
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        image, mode = ImageCms.applyTransform(image, lab_to_srgb), "RGB"
    if mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise UnreadableImageError(f"{name}: PIL cannot convert mode {mode} to RGB ({err}); "
                                       "save it as an RGB PNG or JPEG") from None  # fmt: skip
    return np.asarray(image, dtype=np.float32) / 255.0
