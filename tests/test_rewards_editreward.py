"""EditReward at a tiny size, offline: tensor patchify vs Qwen2VLImageProcessor, heads, loading.

The test tokenizer is a word-level ``PreTrainedTokenizerFast`` (``tokenizers.models.WordLevel``
with a whitespace/punctuation pre-tokenizer, ~40 words, unknown words -> ``[UNK]``) holding
the special tokens Qwen2.5-VL's chat template and processor use (``<|endoftext|>`` as pad,
``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
``<|video_pad|>``); ``<|Reward|>`` is added by :func:`rewards.editreward.add_reward_token`
exactly as for the real tokenizer. It has no chat template, so the built-in Qwen2.5-VL
template is used.
"""

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import rewards
from rewards import editreward as E
from rewards import preprocess as P

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "image", "edited", "source", "the",
         "instruction", "Text", "-", "score", "Please", "provide", "overall", "ratings", "of", "this", ":", "END",
         "add", "red", "hat", "make", "sky", "blue", "remove", "cat", "and"]


SMALL = 64 * 28 * 28  # model tests: 224x224 -> 64 tokens per image (the default 256*28*28 is tested above)


def photo(name):
    arr = getattr(skimage.data, name)().copy()
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


def tiny_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *SPECIALS, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|endoftext|>")
    E.add_reward_token(tok)
    return tok


def tiny_config(tok):
    from transformers import Qwen2_5_VLConfig

    ids = tok.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = tiny_config(tok)
    model = E.EditRewardModel(cfg)
    return tok, cfg, model, E.EditRewardReward(model, tok, pixels=SMALL)


# --- preprocessing -------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w in [(512, 512), (300, 451), (64, 1000), (1024, 768), (448, 448), (33, 57)]:
        assert E.smart_resize(h, w) == smart_resize(h, w, 28, E.PIXELS, E.PIXELS), (h, w)
        rh, rw = E.smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0


def test_patch_layout_exact():
    """No resize, no rescale/normalise: the flattened layout must be bit-identical."""
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=E.PIXELS, max_pixels=E.PIXELS, do_rescale=False, do_normalize=False)
    x = torch.rand(1, 3, 448, 448)  # 448*448 = 256*28*28: smart_resize keeps it
    ref = proc(images=x[0], return_tensors="pt")
    flat, grid = E.patchify(x)
    assert torch.equal(grid, ref["image_grid_thw"]) and grid.tolist() == [[1, 32, 32]]
    assert flat.shape == (1024, 3 * 2 * 14 * 14)
    assert torch.equal(flat, ref["pixel_values"])
    # and with the processor's own rescale + normalise on an 8-bit photo that needs no resize
    pil, img = photo("astronaut")
    pil = pil.resize((448, 448))
    img = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    ref = Qwen2VLImageProcessor(min_pixels=E.PIXELS, max_pixels=E.PIXELS)(images=pil, return_tensors="pt")
    flat, grid = E.pixel_inputs(img)
    torch.testing.assert_close(flat, ref["pixel_values"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_tensor_path_matches_qwen2vl_processors(name):
    """In [0,1] units (|diff| * std). Both processors resize the 8-bit image and round; we resize floats.

    Measured (transformers 5.23; the torchvision and PIL processors agree with each other):
    astronaut 512x512 -> 448x448: mean 1.06e-3, max 1.65e-2; chelsea 300x451 -> 392x560:
    mean 1.16e-3, max 4.2e-3 (coffee 400x600: mean 1.17e-3, max 3.3e-2).
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil

    pil, x = photo(name)
    ours, grid = E.pixel_inputs(x)
    std = torch.tensor(P.CLIP_STD).repeat_interleave(2 * 14 * 14)  # columns are (channel, t, py, px)
    for proc in (Qwen2VLImageProcessor(min_pixels=E.PIXELS, max_pixels=E.PIXELS),
                 Qwen2VLImageProcessorPil(min_pixels=E.PIXELS, max_pixels=E.PIXELS)):
        ref = proc(images=pil, return_tensors="pt")
        assert torch.equal(grid, ref["image_grid_thw"]), (name, grid, ref["image_grid_thw"])
        d = (ours - ref["pixel_values"]).abs() * std
        assert d.mean() < 1.5e-3 and d.max() < 0.02, (type(proc).__name__, name, float(d.mean()), float(d.max()))


# --- model -----------------------------------------------------------------------------------
def test_prompt_text_and_image_tokens(tiny):
    tok, cfg, model, r = tiny
    text = r.texts(["add a red hat"], 0, [[1, 32, 32], [1, 32, 32]])[0]
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|>")
    assert text.endswith("Text instruction - add a red hat\n\nPlease provide the overall ratings of this image: "
                         "<|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 2 * 256 and "**Instruction Following & Semantic Fidelity**" in text
    assert "**Visual Quality & Realism**" in r.texts(["x"], 1, [[1, 32, 32]] * 2)[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(cfg.image_token_id) == 512 and ids.count(r.reward_token_id) == 1
    sd = model.state_dict()
    for k in ["model.visual.patch_embed.proj.weight", "model.visual.merger.mlp.0.weight",
              "model.language_model.embed_tokens.weight", "model.language_model.layers.1.self_attn.q_proj.weight",
              "model.language_model.norm.weight", "lm_head.weight", "rm_heads.head_0.0.weight",
              "rm_heads.head_0.3.weight", "rm_heads.head_1.5.bias"]:
        assert k in sd, k
    assert sd["rm_heads.head_1.0.weight"].shape == (1024, 32) and sd["rm_heads.head_1.5.weight"].shape == (2, 16)
    assert all(p.dtype == torch.float32 for p in model.rm_heads.parameters())


def test_scores_gradients_and_batching(tiny):
    tok, cfg, model, r = tiny
    src = torch.rand(2, 3, 56, 84)
    x = torch.rand(2, 3, 70, 70, requires_grad=True)
    prompts = ["add a red hat", "make the sky blue and remove the cat"]  # different lengths -> padding
    s = r(x, prompts, source_images=src)
    assert s.shape == (2,) and torch.isfinite(s).all()
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    mu, log_sigma = r.score_with_uncertainty(x.detach(), prompts, src)
    assert log_sigma.shape == (2, 2)
    torch.testing.assert_close(mu, s.detach())
    # the score is the mean of the heads' mu, each head run with its own prompt
    with torch.no_grad():
        per_head = []
        for h in range(2):
            b = r.inputs(x.detach(), prompts, src, h)
            per_head.append(model.head(h, model.hidden_at(reward_token_id=r.reward_token_id, **b)))
        assert not torch.allclose(per_head[0], per_head[1])
    torch.testing.assert_close(s.detach(), torch.stack(per_head, 1)[..., 0].mean(-1))
    one = r.score_batched(x.detach(), prompts, batch_size=1, source_images=src)  # one by one
    torch.testing.assert_close(s.detach(), one, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="source_images"):
        r(x.detach(), prompts)
    with pytest.raises(ValueError, match="reserved"):
        r(x.detach(), ["<|Reward|>", "a"], source_images=src)


def test_checkpoint_round_trip_and_safe_loading(tiny, tmp_path):
    from safetensors.torch import save_file

    tok, cfg, model, r = tiny
    src, x, prompts = torch.rand(1, 3, 60, 60), torch.rand(1, 3, 60, 60), ["add a red hat"]
    want = r(x, prompts, source_images=src)
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "pth").mkdir()
    torch.save({"model": sd}, tmp_path / "pth" / "model.pth")  # the reference unwraps {"model": ...} too
    kw = dict(tokenizer=tok, config=cfg, dtype=None, pixels=SMALL)
    for ckpt in (tmp_path / "model.safetensors", tmp_path / "pth"):
        got = rewards.load("editreward", checkpoint=str(ckpt), **kw)
        torch.testing.assert_close(got(x, prompts, source_images=src), want)
    # bf16 backbone as released (model.to(bf16), heads kept in fp32): runs, close to fp32
    bf = rewards.load("editreward", checkpoint=str(tmp_path / "model.safetensors"), **dict(kw, dtype=torch.bfloat16))
    assert bf.model.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf.model.rm_heads.parameters())
    torch.testing.assert_close(bf(x, prompts, source_images=src), want, atol=0.02, rtol=0)
    # transformers < 4.52 key layout (visual.*, model.layers.*) maps onto the current one
    legacy = {("visual." + k[len("model.visual."):]) if k.startswith("model.visual.") else
              ("model." + k[len("model.language_model."):]) if k.startswith("model.language_model.") else k: v
              for k, v in sd.items()}
    torch.save(legacy, tmp_path / "legacy.pth")
    mimo = rewards.load("editreward-mimo", checkpoint=str(tmp_path / "legacy.pth"), **kw)
    assert mimo.name == "editreward-mimo"
    torch.testing.assert_close(mimo(x, prompts, source_images=src), want)
    # missing key -> loud failure naming it
    torch.save({k: v for k, v in sd.items() if k != "rm_heads.head_1.5.bias"}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing key.*rm_heads\.head_1\.5\.bias"):
        rewards.load("editreward", checkpoint=str(tmp_path / "bad.pth"), **kw)
    # pickles that need code are refused, nothing executed
    torch.save({"model": sd, "args": _Args()}, tmp_path / "code.pth")
    with pytest.raises(rewards.UnsafeCheckpointError):
        rewards.load("editreward", checkpoint=str(tmp_path / "code.pth"), **kw)
    # offline errors name the option
    with pytest.raises(rewards.MissingWeightsError, match="checkpoint="):
        rewards.load("editreward", **kw)
    with pytest.raises(rewards.MissingWeightsError, match="model.pth|model.safetensors"):
        rewards.load("editreward", checkpoint=str(tmp_path / "empty_dir_missing"), **kw)
    with pytest.raises(rewards.MissingWeightsError, match="base_model="):
        rewards.load("editreward", checkpoint=str(tmp_path / "model.safetensors"), base_model="nobody/not-cached")


class _Args:  # stands in for the TrainingArguments object a careless save might include
    pass
