"""PickScore, ImageReward, DINO (transformers / own modules) and LPIPS at tiny sizes, offline."""

import string

import pytest
import skimage.data
import torch
from PIL import Image

import rewards
from rewards import preprocess as P


def photo(name):
    arr = getattr(skimage.data, name)().copy()
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


def clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase)
    vocab = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


# --- PickScore -------------------------------------------------------------------------
def test_pickscore_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    kw = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
              do_center_crop=True, image_mean=list(P.CLIP_MEAN), image_std=list(P.CLIP_STD))
    from rewards.pickscore import PickScoreReward

    r = PickScoreReward(torch.nn.Linear(1, 1), tokenizer=None)
    for proc in (CLIPImageProcessorPil(**kw), CLIPImageProcessor(**kw)):
        for name in ("astronaut", "chelsea", "coffee"):
            pil, x = photo(name)
            ref = proc(images=pil, return_tensors="pt")["pixel_values"]
            d = (r.pixels(x) - ref).abs() * torch.tensor(P.CLIP_STD).view(1, 3, 1, 1)  # back to [0,1] units
            assert d.mean() < 2e-3 and d.max() < 0.03, (type(proc).__name__, name, float(d.mean()), float(d.max()))


def tiny_clip_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=53, bos_token_id=52,
                         pad_token_id=53),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


def test_pickscore_tiny():
    from rewards.pickscore import PickScoreReward

    model = tiny_clip_model()
    tok = clip_tokenizer()
    r = PickScoreReward(model, tok)
    x = torch.rand(2, 3, 100, 130, requires_grad=True)
    s = r(x, ["a cat", "a dog"])
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        t = tok(["a cat", "a dog"], padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=r.pixels(x))
    # CLIPModel's own logits_per_image = logit_scale.exp() * cos: PickScore is its diagonal
    torch.testing.assert_close(s.detach(), out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-5)
    one = torch.cat([r(x[i : i + 1].detach(), p) for i, p in enumerate(["a cat", "a dog"])])
    torch.testing.assert_close(r.score_batched(x.detach(), ["a cat", "a dog"], batch_size=1), one)


def test_pickscore_from_directory(tmp_path):
    model = tiny_clip_model()
    model.save_pretrained(tmp_path / "pick")
    r = rewards.load("pickscore", model=str(tmp_path / "pick"), tokenizer=clip_tokenizer())
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(r(x, "a cat"), rewards.load("pickscore", model=str(tmp_path / "pick"),
                                                           tokenizer=clip_tokenizer())(x, "a cat"))
    with pytest.raises(rewards.MissingWeightsError, match="model="):
        rewards.load("pickscore", model="yuvalkirstain/not-cached-anywhere", tokenizer=clip_tokenizer())


# --- ImageReward -----------------------------------------------------------------------
def bert_tokenizer(tmp_path):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "cube", "photo", "of"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


TINY_IR = dict(image_size=32, patch_size=16, vision_width=24, vision_layers=1, vision_heads=2, hidden_size=16,
               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=14,
               max_position_embeddings=40, embed_dim=8)


def test_imagereward_released_layout(tmp_path):
    from safetensors.torch import save_file

    from rewards.imagereward import IR_MEAN, IR_STD, ImageRewardConfig, ImageRewardModel

    torch.manual_seed(0)
    ref = ImageRewardModel(ImageRewardConfig(**TINY_IR)).eval()
    sd = ref.state_dict()
    # the released key layout
    for k in ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "blip.visual_encoder.patch_embed.proj.weight",
              "blip.visual_encoder.blocks.0.attn.qkv.weight", "blip.visual_encoder.blocks.0.mlp.fc2.bias",
              "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.word_embeddings.weight",
              "blip.text_encoder.embeddings.position_embeddings.weight", "blip.text_encoder.embeddings.LayerNorm.bias",
              "blip.text_encoder.encoder.layer.0.attention.self.query.weight",
              "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.weight",
              "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
              "blip.text_encoder.encoder.layer.0.intermediate.dense.weight",
              "blip.text_encoder.encoder.layer.0.output.dense.weight", "blip.vision_proj.weight", "blip.text_proj.weight",
              "mlp.layers.0.weight", "mlp.layers.2.weight", "mlp.layers.4.weight", "mlp.layers.6.weight", "mlp.layers.7.bias"]:
        assert k in sd, k
    assert sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (16, 24)  # encoder_width
    assert not any("token_type" in k for k in sd)
    sd_pt = dict(sd, **{"blip.text_encoder.embeddings.position_ids": torch.arange(40)[None]})  # persisted buffer
    torch.save(sd_pt, tmp_path / "ImageReward.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ir.safetensors"))
    tok = bert_tokenizer(tmp_path)
    assert len(tok) == 14  # vocab + [DEC] + [ENC], as 30522 + 2 = 30524 in the release
    r = rewards.load("imagereward", checkpoint=str(tmp_path), tokenizer=tok, config=TINY_IR)
    r2 = rewards.load("imagereward", checkpoint=str(tmp_path / "ir.safetensors"), tokenizer=tok, config=TINY_IR)
    x = torch.rand(2, 3, 48, 40, requires_grad=True)
    s = r(x, ["a photo of a cat", "a red cube"])
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(r2(x.detach(), ["a photo of a cat", "a red cube"]), s.detach())
    # independent recomputation of the normalised reward
    with torch.no_grad():
        t = tok(["a photo of a cat", "a red cube"], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert t["input_ids"].shape == (2, 35)
        raw = ref.raw(r.pixels(x), t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(s.detach(), (raw - IR_MEAN) / IR_STD)
    one = torch.cat([r(x[i : i + 1].detach(), p) for i, p in enumerate(["a photo of a cat", "a red cube"])])
    torch.testing.assert_close(r.score_batched(x.detach(), ["a photo of a cat", "a red cube"], batch_size=1), one,
                               atol=1e-5, rtol=1e-5)
    # padding is masked: a prompt's score does not depend on max_length padding tokens
    assert r.info.mean == 0.0 and r.info.std == 1.0
    # missing keys fail loudly and name the key
    bad = {k: v for k, v in sd.items() if not k.startswith("mlp.layers.7")}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing key.*mlp\.layers\.7"):
        rewards.load("imagereward", checkpoint=str(tmp_path / "bad.pt"), tokenizer=tok, config=TINY_IR)
    # VP-Score: same architecture, user checkpoint and constants; running stats in composites without them
    vp = rewards.load("vp-score", checkpoint=str(tmp_path / "ImageReward.pt"), tokenizer=tok, config=TINY_IR)
    torch.testing.assert_close(vp(x.detach(), ["a photo of a cat", "a red cube"]), raw)
    assert vp.info.mean is None
    with pytest.raises(rewards.MissingWeightsError, match="checkpoint="):
        rewards.load("vp-score")


def test_imagereward_preprocess_matches_reference_transform():
    import torchvision.transforms as T

    from rewards.imagereward import ImageRewardModel, ImageRewardReward

    r = ImageRewardReward(ImageRewardModel(__import__("rewards.imagereward", fromlist=["x"]).ImageRewardConfig(**{**TINY_IR, "image_size": 224})), None)
    ref_t = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize(P.CLIP_MEAN, P.CLIP_STD)])
    for name in ("astronaut", "coffee"):
        pil, x = photo(name)
        d = (r.pixels(x)[0] - ref_t(pil)).abs() * torch.tensor(P.CLIP_STD).view(3, 1, 1)
        assert d.mean() < 2e-3 and d.max() < 0.03


# --- DINO ------------------------------------------------------------------------------
def test_dino_tiny(tmp_path):
    import torchvision.transforms as T
    from transformers import Dinov2Config, Dinov2Model

    from rewards.dino import DinoSimilarity

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     patch_size=14, image_size=224)).eval()
    model.save_pretrained(tmp_path / "dino")
    r = rewards.load("dino", model=str(tmp_path / "dino"), scale=100.0)
    x = torch.rand(2, 3, 70, 90, requires_grad=True)
    ref = torch.rand(2, 3, 60, 60)
    s = r(x, reference_images=ref)
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(r(ref, reference_images=ref), torch.full((2,), 100.0), atol=1e-3, rtol=0)
    ref_t = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize(P.IMAGENET_MEAN, P.IMAGENET_STD)])
    pil, img = photo("chelsea")
    d = (r.pixels(img)[0] - ref_t(pil)).abs() * torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
    assert d.mean() < 2e-3 and d.max() < 0.03
    assert isinstance(r, DinoSimilarity)


# --- LPIPS -----------------------------------------------------------------------------
def test_lpips_backbone_mapping_and_range(tmp_path):
    import lpips
    import torchvision

    from rewards.lpips_reward import LPIPSReward

    torch.manual_seed(0)
    tv = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(tv.state_dict(), path)
    r = rewards.load("lpips", net="squeeze", backbone_weights=str(path))
    torch.testing.assert_close(r.lpips.net.slice1[0].weight, tv.features[0].weight)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    y = torch.rand(2, 3, 64, 64)
    d = r(x, reference_images=y)
    d.sum().backward()
    assert x.grad.abs().sum() > 0
    assert torch.allclose(r(y, reference_images=y), torch.zeros(2), atol=1e-6)
    # the [0,1] -> [-1,1] conversion happens exactly once: same as lpips' own normalize=True
    with torch.no_grad():
        torch.testing.assert_close(d.detach(), r.lpips(x, y, normalize=True).flatten())
    sim = rewards.load("lpips-sim", net="squeeze", backbone_weights=str(path))
    torch.testing.assert_close(sim(x.detach(), reference_images=y), 1 - d.detach())
    with pytest.raises(ValueError, match="reference_images"):
        r(x)
    with pytest.raises(rewards.MissingWeightsError, match="backbone_weights="):
        LPIPSReward(net="alex", backbone_weights=str(tmp_path / "nope.pth"))
    assert isinstance(r.lpips, lpips.LPIPS)
