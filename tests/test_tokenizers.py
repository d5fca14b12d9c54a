"""Offline tokenizers: exact CLIP ids, small CLIP/T5 vocabularies, save/reload."""

from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import AutoTokenizer, CLIPTokenizer, T5Tokenizer

from pipelines.tokenizers import CLIP_FULL_VOCAB_SIZE, bytes_to_unicode, clip_tokenizer, t5_tokenizer

SENTENCES = [
    "a photo of a red cat",
    "An astronaut riding a horse on Mars, 4k, highly detailed!",
    "Hello, World! It's 2024 -- émigré café",
    "  multiple   spaces\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def full_clip() -> CLIPTokenizer:
    return clip_tokenizer()


def test_bytes_to_unicode_is_reversible_and_printable():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(not ch.isspace() for ch in table.values())


def test_full_clip_matches_open_clip(full_clip: CLIPTokenizer):
    reference = SimpleTokenizer()
    assert len(full_clip) == CLIP_FULL_VOCAB_SIZE == reference.vocab_size
    for text in SENTENCES:
        expected = [reference.sot_token_id, *reference.encode(text), reference.eot_token_id]
        assert full_clip(text).input_ids == expected, text


def test_full_clip_special_tokens(full_clip: CLIPTokenizer):
    assert full_clip.bos_token_id == 49406
    assert full_clip.eos_token_id == full_clip.pad_token_id == 49407
    ids = full_clip("a red cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[-1] == 49407


def test_small_clip_is_real_bpe():
    tok = clip_tokenizer(num_merges=500)
    assert len(tok) == 512 + 500 + 2
    assert tok.bos_token_id == len(tok) - 2
    assert tok.eos_token_id == tok.pad_token_id == len(tok) - 1
    ids = tok("a photo of a red cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # Merges are applied (fewer tokens than characters) and every id is in range.
    assert len(ids) - 2 < len("aphotoofaredcat")
    assert max(ids) < len(tok) and tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red cat"


def test_small_clip_prefix_of_full(full_clip: CLIPTokenizer):
    small = clip_tokenizer(num_merges=500)
    full_vocab = full_clip.get_vocab()
    for token, idx in small.get_vocab().items():
        if not token.startswith("<|"):
            assert full_vocab[token] == idx


@pytest.mark.parametrize("num_merges", [500, None])
def test_clip_save_and_reload(tmp_path, num_merges):
    tok = clip_tokenizer(num_merges=num_merges)
    tok.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok)
    assert reloaded.pad_token_id == tok.pad_token_id and reloaded.model_max_length == 77
    for text in SENTENCES:
        assert reloaded(text).input_ids == tok(text).input_ids


def test_t5_known_ids():
    tok = t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    vocab = tok.get_vocab()
    ids = tok("a photo of a red cat").input_ids
    expected = [vocab[p] for p in ("▁a", "▁photo", "▁of", "▁a", "▁red", "▁cat")] + [1]
    assert ids == expected
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red cat"


def test_t5_has_no_unknown_letters():
    tok = t5_tokenizer()
    text = "Zyxomma quizzically juggles 42 VEXING jackdaws; wow!? (yes) 3.14"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_t5_padding_and_reload(tmp_path):
    tok = t5_tokenizer(model_max_length=16)
    batch = tok(["a red cat", "a photo of a dog on the beach"], padding="max_length", max_length=16,
                truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 16)
    assert batch.input_ids[0, 4:].eq(0).all() and batch.attention_mask[0].sum() == 4
    tok.save_pretrained(tmp_path)
    for cls in (T5Tokenizer, AutoTokenizer):
        reloaded = cls.from_pretrained(tmp_path)
        assert len(reloaded) == len(tok)
        again = reloaded(["a red cat", "a photo of a dog on the beach"], padding="max_length", max_length=16,
                         truncation=True, return_tensors="pt")
        assert torch.equal(again.input_ids, batch.input_ids)
