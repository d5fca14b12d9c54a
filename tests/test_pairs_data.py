"""Preference-pair datasets: every bad row is found before training, listed by number, or skipped on request."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.cli import main
from rewards.training import MIN_IMAGE_SIDE, PairDataConfig, load_pairs

CFG = PairDataConfig(image_size=16)


def _png(path: Path, width: int, height: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path.name


def _png_bytes(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def mixed_pairs(tmp_path) -> Path:
    """Nine pairs: rows 1, 3 and 9 are good, the other six each break one rule."""
    a, b = _png(tmp_path / "a.png", 32, 32, 1), _png(tmp_path / "b.png", 32, 32, 2)
    big = _png(tmp_path / "big.png", 64, 64, 3)  # same shape as a, another scale: fine
    wide = _png(tmp_path / "wide.png", 48, 32, 4)  # another shape: both would be squashed differently
    tiny = _png(tmp_path / "tiny.png", 4, 4, 5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    records = [
        {"prompt": "one", "image_0": a, "image_1": b, "label": "A"},  # 1 good
        {"prompt": "two", "image_0": a, "image_1": "missing.png", "label": "A"},  # 2 missing file
        {"prompt": "three", "image_0": b, "image_1": a, "label": 0},  # 3 good
        {"prompt": "four", "image_0": a, "image_1": b, "label": "C"},  # 4 unknown label
        {"prompt": "five", "image_0": "broken.png", "image_1": b, "label": "B"},  # 5 does not decode
        {"prompt": "six", "image_0": a, "image_1": wide, "label": "A"},  # 6 different shapes
        {"prompt": "seven", "image_0": tiny, "image_1": tiny, "label": "tie"},  # 7 too small
        {"prompt": "eight", "image_0": a, "label": "B"},  # 8 no image_1 at all
        {"prompt": "nine", "image_0": a, "image_1": big, "label": "tie"},  # 9 good
    ]
    return _write_jsonl(tmp_path / "pairs.jsonl", records)


def test_every_bad_row_is_listed_in_one_error(mixed_pairs):
    with pytest.raises(ValueError) as info:
        load_pairs(str(mixed_pairs), CFG)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{mixed_pairs}: 6 bad rows of 9 (set data.skip_bad_rows=true to train without them): ")
    expected = [
        "row 2: image_1 'missing.png' not found",
        "row 4: unknown label 'C'",
        "row 5: image_0 'broken.png' does not decode",
        "row 6: image_0 is 32x32 but image_1 is 48x32 (different shapes)",
        f"row 7: image_0 is 4x4 px (smaller than {MIN_IMAGE_SIDE} px), image_1 is 4x4 px",
        "row 8: no image_1",
    ]
    positions = [message.index(part) for part in expected]  # each is there, in file order
    assert positions == sorted(positions)
    for good in ("row 1:", "row 3:", "row 9:"):
        assert good not in message


def test_skipping_bad_rows_keeps_the_good_ones_and_reports_the_rest(mixed_pairs):
    with pytest.warns(UserWarning) as caught:
        pairs = load_pairs(str(mixed_pairs), PairDataConfig(image_size=16, skip_bad_rows=True))
    (warning,) = [w for w in caught if "bad rows" in str(w.message)]
    text = str(warning.message)
    assert text.startswith(f"{mixed_pairs}: skipped 6 bad rows of 9")
    assert all(f"row {n}:" in text for n in (2, 4, 5, 6, 7, 8))
    assert [(p.prompt, p.target) for p in pairs] == [("one", 1.0), ("three", 0.0), ("nine", 0.5)]
    assert all(p.image_a.shape == p.image_b.shape == (3, 16, 16) for p in pairs)


def test_a_clean_file_loads_without_a_warning(tmp_path):
    a, b = _png(tmp_path / "a.png", 16, 16, 1), _png(tmp_path / "b.png", 16, 16, 2)
    path = _write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "image_a": a, "image_b": b, "label": "B"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (pair,) = load_pairs(str(path), PairDataConfig(image_size=16, skip_bad_rows=True))
    assert pair.target == 0.0


def test_the_listing_stops_after_ten_rows_and_counts_the_rest(tmp_path):
    a = _png(tmp_path / "a.png", 16, 16)
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"image_a": a, "image_b": a, "label": f"L{i}"} for i in range(15)])
    with pytest.raises(ValueError) as info:
        load_pairs(str(path), CFG)
    message = str(info.value)
    assert "15 bad rows of 15" in message and "row 10: unknown label 'L9'" in message
    assert "row 11:" not in message and message.endswith("; and 5 more")
    with pytest.raises(ValueError, match="every row is bad"):  # skipping everything leaves nothing to train on
        load_pairs(str(path), PairDataConfig(image_size=16, skip_bad_rows=True))


def test_unlabelled_pairs_are_not_bad_rows(tmp_path):
    """A missing label is an unlabelled pair (NaN target: reward training with aspects uses them), not a bad row."""
    a = _png(tmp_path / "a.png", 16, 16)
    path = _write_jsonl(tmp_path / "u.jsonl", [{"image_a": a, "image_b": a, "label": "A"}, {"image_a": a, "image_b": a}])
    pairs = load_pairs(str(path), CFG)
    assert pairs[0].target == 1.0 and math.isnan(pairs[1].target)


def test_pick_a_pic_columns_load_from_parquet(tmp_path):
    """Pick-a-Pic v2's own layout: caption, jpg_0/jpg_1 as JPEG/PNG bytes, label_0 = P(image 0 better)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    label_0 = [1.0, 0.0, 0.5]
    rows = [{"are_different": True, "best_image_uid": f"u{i}", "caption": f"prompt {i}",
             "jpg_0": _png_bytes(24, 24, 2 * i), "jpg_1": _png_bytes(24, 24, 2 * i + 1),
             "label_0": label_0[i], "label_1": 1.0 - label_0[i], "model_0": "m", "model_1": "n"}
            for i in range(3)]  # fmt: skip
    path = tmp_path / "pickapic.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    pairs = load_pairs(str(path), PairDataConfig(image_size=24))
    assert [p.prompt for p in pairs] == ["prompt 0", "prompt 1", "prompt 2"]
    assert [p.target for p in pairs] == label_0
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(rows[1]["jpg_1"])).convert("RGB"))).permute(2, 0, 1) / 255
    torch.testing.assert_close(pairs[1].image_b, expected, rtol=0, atol=1e-6)  # same size: the resize is exact


def test_dpo_reports_bad_pairs_in_one_line_then_trains_without_them(sd15_dir, mixed_pairs, tmp_path, capsys):
    args = ["train", "dpo", f"pipeline={sd15_dir}", f"output_dir={tmp_path / 'run'}", "data.source=pairs",
            f"data.pairs={mixed_pairs}", "sampling.height=32", "sampling.width=32", "sampling.num_steps=2",
            "train.max_steps=1", "train.batch_size=1", "train.report_to=[]", "validation.num_images=0",
            "dpo.num_timesteps=10", "dpo.keep_ties=true"]  # fmt: skip
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "6 bad rows of 9" in line and all(f"row {n}:" in line for n in (2, 4, 5, 6, 7, 8))
    with pytest.warns(UserWarning, match="skipped 6 bad rows of 9"):
        assert main([*args, "data.skip_bad_rows=true"]) == 0
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()
