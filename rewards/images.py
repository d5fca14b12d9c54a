"""Image files in: every PIL mode to RGB, correctly, or a one-line refusal.

The toolkit's one decoder: ``rewards.data`` (datasets, ``filter``, ``eval-reward``,
``train-reward``), ``imgalign.images.load_image`` (``sample --image``, ``score``, training
image folders) all read images through :func:`load_image` / :func:`to_rgb`. It lives in
``rewards`` because that package is where images enter to be judged, and ``imgalign`` may
import it while ``pipelines`` may not (``pipelines.images`` holds the same conversion for
PIL images given to an edit pipeline; a test keeps the two equal).

Why not ``image.convert("RGB")``: PIL clips 16-bit greyscale (``I;16``, ``I``) to 8 bits, so a
16-bit PNG becomes an all-white image; it drops alpha onto black (transparent pixels of a
``P``/``LA``/``RGBA`` image come out black, or as whatever colour the hidden pixels hold);
and it ignores the EXIF orientation a camera writes. Here:

* EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``);
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is scaled by 65535 (``I`` values
  outside 0..65535 are refused); float greyscale (``F``) is taken as [0, 1] if it lies there,
  otherwise refused;
* alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry, ``RGBa``/``La``) is
  composited **on white**, the background the Shapes world and most generators draw on;
* ``CMYK``, ``YCbCr`` and ``HSV`` use PIL's conversion (naive CMYK: no ICC colour management);
  ``LAB`` goes through ``PIL.ImageCms`` (CIELAB -> sRGB);
* ``1``, ``L`` and ``P`` are expanded to RGB; any other mode PIL cannot convert is refused.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["UnreadableImageError", "load_image", "to_rgb", "to_rgb_array", "warn_if_small"]

#: Modes handled by scaling 16/32-bit integers to [0, 1].
_INTEGER_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(ValueError):
    """An image that cannot be decoded or converted to RGB; the message names the file."""


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


def to_rgb(image: Any, name: str = "image") -> Any:
    """A PIL image converted to an 8-bit ``RGB`` PIL image by the rules of :func:`to_rgb_array`."""
    from PIL import Image

    if image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1:  # nothing to convert or rotate
        return image.copy()
    array = to_rgb_array(image, name)
    return Image.fromarray((array * 255.0).round().clip(0, 255).astype(np.uint8), "RGB")


def load_image(source: str | os.PathLike | bytes | io.BytesIO | Any, *, name: str | None = None) -> Tensor:
    """An image file (path, bytes, a file object or a PIL image) as float ``[1, 3, H, W]`` in [0, 1].

    Raises ``FileNotFoundError`` for a missing path and :class:`UnreadableImageError` (a
    ``ValueError``) naming the file for anything that does not decode or convert.
    """
    from PIL import Image, UnidentifiedImageError

    if hasattr(source, "mode") and hasattr(source, "getexif"):  # already a PIL image
        return _tensor(to_rgb_array(source, name or "image"))
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise UnreadableImageError(f"{label} is a directory, not an image file")
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {label}")
    try:
        with Image.open(source) as image:
            image.load()
            array = to_rgb_array(image, label)
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{label} is not an image PIL can read (corrupt, or not an image file)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # truncated / corrupt data
        if isinstance(err, FileNotFoundError):
            raise
        raise UnreadableImageError(f"{label} does not decode ({' '.join(str(err).split())})") from None
    return _tensor(array)


def _tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()


def warn_if_small(image: Tensor, expected_side: int | None, name: str = "image", factor: int = 4) -> bool:
    """Warn when an image's shorter side is less than ``expected_side / factor`` pixels.

    A reward or model resizes such an image up many times over and judges interpolation blur,
    not the picture; the score is then rarely what the user meant. Returns whether it warned.
    """
    if not expected_side:
        return False
    side = min(image.shape[-2:])
    if side * factor < expected_side:
        warnings.warn(f"{name} is {image.shape[-1]}x{image.shape[-2]} px, far smaller than the model's "
                      f"{expected_side} px input: it is upscaled {expected_side / side:.0f}x", stacklevel=2)  # fmt: skip
        return True
    return False
