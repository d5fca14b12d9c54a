"""open_clip-based rewards (CLIP score, CLIP-I, aesthetic, HPSv2) at tiny sizes + preprocessing parity."""

import pytest
import skimage.data
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import rewards
from rewards import preprocess as P
from rewards.aesthetic import AestheticMLP
from rewards.clip_score import build_open_clip

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PHOTOS = ["astronaut", "chelsea", "coffee"]


def photo(name):
    arr = getattr(skimage.data, name)().copy()
    return Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = build_open_clip(TINY, load_weights=False)
    d = tmp_path_factory.mktemp("clip")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, d / "HPS_v2.1_compressed.pt")  # HPS layout
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d, model


def test_hps_pad_resize_matches_reference():
    """HPSv2 (ToTensor -> torchvision F.resize on the tensor -> F.pad): exact; PIL path: close."""
    for name in PHOTOS:
        pil, x = photo(name)
        h, w = x.shape[-2:]
        s = 224 / max(h, w)
        nh, nw = round(h * s), round(w * s)
        for aa in (True, False):
            ref = TF.resize(x[0], [nh, nw], T.InterpolationMode.BICUBIC, antialias=aa)
            ref = TF.pad(ref, [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2])
            ours = P.resize_longest_and_pad(x, 224, antialias=aa)[0]
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        pr = TF.to_tensor(pil.resize((nw, nh), Image.BICUBIC))
        pr = TF.pad(pr, [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2])
        d = (P.resize_longest_and_pad(x, 224, clamp=True)[0] - pr).abs()
        assert d.mean() < 2e-3 and d.max() < 0.03, (name, float(d.mean()), float(d.max()))
    # scale == 1: no resize and no pad, exactly like ResizeMaxSize
    y = torch.rand(1, 3, 224, 100)
    assert P.resize_longest_and_pad(y, 224) is y


def test_clip_shortest_crop_matches_torchvision_pil():
    for name in PHOTOS:
        pil, x = photo(name)
        ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])(pil)
        d = (P.resize_shortest_and_center_crop(x, 224, clamp=True)[0] - ref).abs()
        assert d.mean() < 2e-3 and d.max() < 0.03, (name, float(d.mean()), float(d.max()))
    # center-crop offsets: torchvision rounds, transformers floors
    z = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    assert P.center_crop(z, (1, 4), offset="round")[0, 0, 0, 0] == 2  # round(1.5) = 2
    assert P.center_crop(z, (1, 4), offset="floor")[0, 0, 0, 0] == 1


def test_clip_score_tiny(tiny_clip_file):
    d, model = tiny_clip_file
    r = rewards.load("clip", arch=TINY, pretrained=None, checkpoint=str(d / "open_clip_model.safetensors"))
    torch.testing.assert_close(r.encoder.model.state_dict()["logit_scale"], model.state_dict()["logit_scale"])
    x = torch.rand(3, 3, 64, 96, requires_grad=True)
    s = r(x, ["a red cube", "a cat", "two dogs"])
    assert s.shape == (3,) and (s.abs() <= 1 + 1e-5).all()
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    one = torch.cat([r(x[i : i + 1].detach(), p) for i, p in enumerate(["a red cube", "a cat", "two dogs"])])
    torch.testing.assert_close(r.score_batched(x.detach(), ["a red cube", "a cat", "two dogs"], batch_size=2), one,
                               atol=1e-5, rtol=1e-5)
    # cosine of the open_clip embeddings, computed independently
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()(["a cat"])
    with torch.no_grad():
        px = P.normalize(P.resize_shortest_and_center_crop(x[1:2].detach(), 224, clamp=True), P.CLIP_MEAN, P.CLIP_STD)
        a = torch.nn.functional.normalize(model.encode_image(px), dim=-1)
        b = torch.nn.functional.normalize(model.encode_text(tok), dim=-1)
    torch.testing.assert_close(one[1], (a * b).sum(), atol=1e-5, rtol=1e-5)
    t100 = rewards.load("clip-t", arch=TINY, pretrained=None, checkpoint=str(d / "open_clip_model.safetensors"))
    torch.testing.assert_close(t100(x.detach()[1:2], "a cat"), 100 * one[1:2], atol=1e-3, rtol=1e-5)
    ci = rewards.load("clip-i", arch=TINY, pretrained=None, checkpoint=str(d / "open_clip_model.safetensors"))
    torch.testing.assert_close(ci(x.detach(), reference_images=x.detach()), torch.full((3,), 100.0), atol=1e-3, rtol=0)


def test_hpsv2_tiny_checkpoint_layout(tiny_clip_file, tmp_path):
    d, model = tiny_clip_file
    r = rewards.load("hpsv2.1", checkpoint=str(d), arch=TINY)  # directory + published filename
    assert r.info.name == "hpsv2.1" and r.encoder.preprocess_cfg["resize_mode"] == "longest"
    x = torch.rand(2, 3, 120, 80, requires_grad=True)
    s = r(x, "a photo")
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        px = P.normalize(P.resize_longest_and_pad(x, 224), P.CLIP_MEAN, P.CLIP_STD)
        a = torch.nn.functional.normalize(model.encode_image(px), dim=-1)
        import open_clip

        b = torch.nn.functional.normalize(model.encode_text(open_clip.tokenizer.SimpleTokenizer()(["a photo"] * 2)), dim=-1)
    torch.testing.assert_close(s.detach(), (a * b).sum(-1), atol=1e-5, rtol=1e-5)  # raw cosine, no logit scale
    # a checkpoint missing a key fails loudly, naming it
    sd = dict(model.state_dict())
    sd.pop("visual.proj")
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="visual.proj"):
        rewards.load("hpsv2", checkpoint=str(tmp_path), arch=TINY)


def test_aesthetic_tiny(tiny_clip_file, tmp_path):
    d, model = tiny_clip_file
    head = AestheticMLP(TINY["embed_dim"])
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    torch.save(head.state_dict(), tmp_path / "head.pth")
    r = rewards.load("aesthetic", arch=TINY, pretrained=None, checkpoint=str(d / "open_clip_model.safetensors"),
                     head_checkpoint=str(tmp_path / "head.pth"))
    x = torch.rand(2, 3, 50, 50, requires_grad=True)
    s = r(x)
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        px = P.normalize(P.resize_shortest_and_center_crop(x, 224, clamp=True), P.CLIP_MEAN, P.CLIP_STD)
        emb = torch.nn.functional.normalize(model.encode_image(px), dim=-1)  # L2-normalised embedding
        torch.testing.assert_close(s.detach(), head.eval()(emb).squeeze(-1), atol=1e-5, rtol=1e-5)
