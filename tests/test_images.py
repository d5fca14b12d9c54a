"""Images in, correctly: every PIL mode through the one loader, grids with captions, ordinary file permissions."""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines.images
import rewards
from imgalign.images import load_image, save_grid, save_png

RED = (1.0, 0.0, 0.0)
WHITE = (1.0, 1.0, 1.0)


def _encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _pixel(tensor: torch.Tensor, x: int = 0, y: int = 0) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in tensor[0, :, y, x])


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 4), 1)  # index 1 (red) everywhere ...
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)  # ... but pixel (0, 0) is index 0: blue, made transparent below
    return image


# (name, PIL image, encoder options, expected pixel (0, 0) after loading, expected pixel (1, 1))
MODES = [
    ("RGB", Image.new("RGB", (4, 4), (255, 0, 0)), {}, RED, RED),
    ("L", Image.new("L", (4, 4), 128), {}, (0.502,) * 3, (0.502,) * 3),
    ("1", Image.new("1", (4, 4), 1), {}, WHITE, WHITE),
    # 16-bit greyscale: 30000/65535, not clipped to 255 (white) as convert("RGB") does
    ("I;16", Image.fromarray(np.full((4, 4), 30000, np.uint16)), {}, (0.458,) * 3, (0.458,) * 3),
    ("I", Image.fromarray(np.full((4, 4), 65535, np.int32)), {"fmt": "TIFF"}, WHITE, WHITE),
    ("P", _palette_image(), {}, (0.0, 0.0, 1.0), RED),
    ("P+transparency", _palette_image(), {"transparency": 0}, WHITE, RED),  # transparent index -> white
    ("LA", Image.new("LA", (4, 4), (0, 128)), {}, (0.498,) * 3, (0.498,) * 3),  # black at half alpha on white
    ("RGBA", Image.new("RGBA", (4, 4), (255, 0, 0, 0)), {}, WHITE, WHITE),  # fully transparent red -> white
    ("CMYK", Image.new("CMYK", (4, 4), (0, 255, 255, 0)), {"fmt": "JPEG", "quality": 100}, RED, RED),
]


@pytest.mark.parametrize(("mode", "image", "options", "first", "second"), MODES, ids=[m[0] for m in MODES])
def test_every_pil_mode_loads_as_rgb_in_0_1(mode, image, options, first, second, tmp_path):
    options = dict(options)
    fmt = options.pop("fmt", "PNG")
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encode(image, fmt, **options))
    tensor = load_image(path)
    assert tensor.shape == (1, 3, 4, 4) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert _pixel(tensor) == pytest.approx(first, abs=0.02)
    assert _pixel(tensor, 1, 1) == pytest.approx(second, abs=0.02)
    # the datasets' reader (filter, eval-reward, train-reward) is the same loader
    np.testing.assert_array_equal(rewards.data.load_image_value(str(path)).numpy(), tensor.numpy())
    # and a PIL image handed to an edit pipeline converts the same way (pipelines cannot import rewards)
    with Image.open(path) as opened:
        in_pipeline = pipelines.images.to_rgb_array(opened)
    np.testing.assert_allclose(in_pipeline, tensor[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tensor = rewards.load_image(_encode(image, exif=exif))
    assert tensor.shape == (1, 3, 4, 2)  # displayed portrait, as a viewer shows it
    assert _pixel(tensor, 1, 0) == WHITE  # the top-left pixel moved to the top-right


def test_lab_is_colour_managed_and_float_outside_0_1_is_refused(tmp_path):
    black = Image.new("LAB", (2, 2), (0, 128, 128))
    assert _pixel(rewards.load_image(black)) == pytest.approx((0.0, 0.0, 0.0), abs=0.01)
    wild = Image.fromarray(np.full((2, 2), 7.5, np.float32))
    with pytest.raises(rewards.UnreadableImageError, match="mode F"):
        rewards.load_image(wild)


@pytest.mark.parametrize("content", [b"", b"not an image at all", _encode(Image.new("RGB", (8, 8)))[:40]],
                         ids=["empty", "garbage", "truncated"])  # fmt: skip
def test_unreadable_files_are_one_line_errors_naming_the_file(content, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(rewards.UnreadableImageError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_a_far_smaller_image_is_warned_about(tmp_path):
    save_png(torch.rand(3, 16, 16), tmp_path / "small.png")
    with pytest.warns(UserWarning, match="far smaller than the model's 224 px input"):
        load_image(tmp_path / "small.png", expected_side=224)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "small.png", expected_side=32)  # 2x: not "far" smaller


def test_grid_with_captions_and_scores(tmp_path):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_grid(images, tmp_path / "plain.png", ncols=2)
    save_grid(images, tmp_path / "captioned.png", ncols=2, captions=["a red circle"] * 4,
              scores=[{"shapes-oracle": 0.5, "shapes-clip": 0.25}] * 4)  # fmt: skip
    with Image.open(tmp_path / "plain.png") as plain, Image.open(tmp_path / "captioned.png") as captioned:
        assert plain.size == (2 * 34 + 2, 2 * 34 + 2)
        width, height = captioned.size
        assert width >= 2 * 128 and height > width  # cells enlarged to 128 px, caption bands below
        band = np.asarray(captioned.convert("L"))[130:160, 2:130]
        assert (band < 128).any()  # text was drawn under the first cell


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_respect_the_umask(tmp_path):
    """No 0600 weight files in 0700 directories: temporaries are made like ordinary files."""
    from imgalign.io import atomic_directory, atomic_write_bytes, ordinary_permissions
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        save_png(torch.rand(3, 8, 8), tmp_path / "a.png")
        atomic_write_bytes(tmp_path / "b.json", b"{}")
        with atomic_directory(tmp_path / "c") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors itself writes 0600
        assert _mode(tmp_path / "a.png") == 0o644
        assert _mode(tmp_path / "b.json") == 0o644
        assert _mode(tmp_path / "c") == 0o755 and _mode(tmp_path / "c" / "w.safetensors") == 0o644
        os.umask(0o027)
        save_file({"w": torch.zeros(2)}, str(tmp_path / "d.safetensors"))
        ordinary_permissions(tmp_path / "d.safetensors")
        assert _mode(tmp_path / "d.safetensors") == 0o640
    finally:
        os.umask(old)


def test_a_saved_lora_is_readable_by_others(tmp_path):
    from pipelines.architectures import build_pipeline

    import pipelines as P

    old = os.umask(0o022)
    try:
        adapter = P.load(build_pipeline("sd15", "tiny", seed=0))
        P.add_lora(adapter, rank=2)
        P.save_lora(adapter, tmp_path / "lora")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "lora") == 0o755
    assert _mode(tmp_path / "lora" / "pytorch_lora_weights.safetensors") == 0o644
