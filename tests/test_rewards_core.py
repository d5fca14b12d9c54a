"""Contract, registry, composite and safe-loading tests with tiny toy rewards."""

import pickle

import pytest
import torch

import rewards
from rewards import CompositeReward, Reward, RewardInfo
from rewards.composite import RunningStats
from rewards.loading import MissingWeightsError, UnsafeCheckpointError, load_state_dict, resolve_dir, resolve_file


class PromptBrightness(Reward):
    """mean pixel * (1 + len(prompt)/10): text- and image-dependent, differentiable."""

    info = RewardInfo(name="prompt-brightness", inputs=("images", "prompts"), source="test")

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def _score(self, images, prompts, **cond):
        n = torch.tensor([len(p) / 10 for p in prompts], device=images.device)
        return self.scale * images.mean((1, 2, 3)) * (1 + n)


class RefDistance(Reward):
    info = RewardInfo(name="refdist", inputs=("images", "reference_images"), source="test", mean=0.5, std=2.0)

    def _score(self, images, prompts, reference_images):
        return (images - reference_images).abs().mean((1, 2, 3))


def test_validation_errors():
    r = PromptBrightness()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        r(x * 2 - 1, "a")
    with pytest.raises(ValueError, match="rank 4"):
        r(x[0], "a")
    with pytest.raises(ValueError, match="3 channels"):
        r(torch.rand(2, 4, 8, 8), "a")
    with pytest.raises(ValueError, match="2 images"):
        r(x, ["a", "b", "c"])
    with pytest.raises(ValueError, match="needs prompts"):
        r(x)
    with pytest.raises(ValueError, match="float"):
        r((x * 255).to(torch.uint8), "a")
    with pytest.raises(ValueError, match="reference_images"):
        RefDistance()(x)
    with pytest.raises(ValueError, match="batch size"):
        RefDistance()(x, reference_images=torch.rand(3, 3, 8, 8))
    # tiny overshoot is tolerated and clamped, gradient still flows
    y = (x * 1.0005).requires_grad_()
    r(y, "a").sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_gradients_and_batched_agree():
    r = PromptBrightness()
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    prompts = ["a", "bb", "ccc", "dddd", "e"]
    s = r(x, prompts)
    s.sum().backward()
    assert x.grad.abs().sum() > 0
    one = torch.cat([r(x[i : i + 1].detach(), prompts[i]) for i in range(5)])
    batched = r.score_batched(x.detach(), prompts, batch_size=2)
    torch.testing.assert_close(batched, one)
    assert not batched.requires_grad
    # conditions are chunked too
    ref = torch.rand(5, 3, 8, 8)
    d = RefDistance()
    torch.testing.assert_close(d.score_batched(x.detach(), reference_images=ref, batch_size=3),
                               d(x.detach(), reference_images=ref))


def test_registry_and_spec():
    rewards.register("toy-brightness", lambda scale=1.0: PromptBrightness(scale), overwrite=True)
    assert "toy-brightness" in rewards.available()
    r = rewards.load("toy-brightness", scale=2.0)
    assert isinstance(r, PromptBrightness) and float(r.scale) == 2.0
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("toy-brightness", PromptBrightness)
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.load("no-such-reward")
    assert rewards.parse_spec("a=1,b=0.5, c") == {"a": 1.0, "b": 0.5, "c": 1.0}
    with pytest.raises(ValueError, match="bad weight"):
        rewards.parse_spec("a=x")
    for name in ["clip", "hpsv2", "hpsv2.1", "pickscore", "imagereward", "lpips", "dino", "aesthetic"]:
        assert name in rewards.available()


def test_composite_weights_and_normalisation():
    rewards.register("toy-brightness", lambda scale=1.0: PromptBrightness(scale), overwrite=True)
    rewards.register("toy-refdist", RefDistance, overwrite=True)
    comp = rewards.load({"toy-brightness": 2.0, "toy-refdist": -0.5})
    assert isinstance(comp, CompositeReward)
    assert comp.info.inputs == ("images", "prompts", "reference_images")
    x, ref = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    # eval mode: running stats frozen at (0, 1); refdist uses its published constants
    comp.eval()
    total = comp(x, "ab", reference_images=ref)
    b = PromptBrightness()(x, "ab")
    d = RefDistance()(x, reference_images=ref)
    torch.testing.assert_close(total, 2.0 * b - 0.5 * (d - 0.5) / 2.0)
    comps = comp.score_components(x, "ab", reference_images=ref)
    torch.testing.assert_close(comps["toy-brightness"], b)
    torch.testing.assert_close(comps["total"], total)
    assert comp.stats["toy-brightness"].count == 0
    # training mode: Welford statistics over everything seen, applied to the same batch
    comp.train()
    seen = []
    for _ in range(3):
        xi = torch.rand(4, 3, 8, 8)
        seen.append(PromptBrightness()(xi, "ab"))
        out = comp(xi, "ab", reference_images=ref)
    allb = torch.cat(seen).double()
    st = comp.stats["toy-brightness"]
    assert st.count == 12
    torch.testing.assert_close(st.mean, allb.mean())
    torch.testing.assert_close(st.std, allb.std())
    expect = 2.0 * (seen[-1] - allb.mean().float()) / allb.std().float() - 0.5 * (comp.last_components["toy-refdist"] - 0.5) / 2
    torch.testing.assert_close(out, expect)
    # networks inside stay in eval mode; the reward flag follows
    assert comp.training and comp.member("toy-brightness").training
    plain = CompositeReward({"a": (PromptBrightness(), 1.0), "b": (PromptBrightness(3.0), 0.25)}, normalize="none")
    torch.testing.assert_close(plain(x, "q"), PromptBrightness()(x, "q") + 0.25 * PromptBrightness(3.0)(x, "q"))


def test_running_stats_matches_welford():
    st = RunningStats()
    vals = torch.randn(50, dtype=torch.float64) * 3 + 1
    for chunk in vals.split(7):
        st.update(chunk)
    torch.testing.assert_close(st.mean, vals.mean())
    torch.testing.assert_close(st.std, vals.std())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.pt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": {"w": _Evil(str(target))}}, fh)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        load_state_dict(ckpt)
    assert not target.exists()


def test_safe_formats_and_offline_messages(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(2, 2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    torch.testing.assert_close(load_state_dict(tmp_path / "m.safetensors")["a.weight"], sd["a.weight"])
    assert "state_dict" in load_state_dict(tmp_path / "m.pt")
    with pytest.raises(MissingWeightsError, match=r"HPS_v2.1_compressed.pt.*checkpoint="):
        resolve_file("xswu/HPSv2-not-cached", "HPS_v2.1_compressed.pt", "checkpoint")
    with pytest.raises(MissingWeightsError, match="not found in"):
        resolve_file(tmp_path, "missing.pt", "checkpoint")
    with pytest.raises(MissingWeightsError, match="checkpoint="):
        rewards.load("hpsv2.1")  # not in the (empty) cache: names the file and the option


def test_offline_weight_errors_recommend_hf_download():
    """The current Hugging Face command is `hf download` (`huggingface-cli` is deprecated and may be absent)."""
    with pytest.raises(MissingWeightsError, match=r"`hf download xswu/HPSv2-not-cached HPS_v2\.1_compressed\.pt`") as err:
        resolve_file("xswu/HPSv2-not-cached", "HPS_v2.1_compressed.pt", "checkpoint")
    assert "huggingface-cli" not in str(err.value)
    with pytest.raises(MissingWeightsError, match=r"`hf download someone/not-cached-model`") as err:
        resolve_dir("someone/not-cached-model", "model")
    assert "huggingface-cli" not in str(err.value)


def test_jpeg_compressibility_is_ddpos_negative_kilobytes():
    """DDPO's rule-based reward: -(bytes of a quality-95 JPEG) / 1000; flat images compress, noise does not."""
    import io

    import numpy as np
    from PIL import Image

    import rewards

    g = torch.Generator().manual_seed(0)
    images = torch.stack([torch.full((3, 32, 32), 0.5), torch.rand(3, 32, 32, generator=g)])
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    expected = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buffer, format="JPEG", quality=95)
        expected.append(-buffer.tell() / 1000)
    scores = rewards.load("jpeg-compressibility")(images)
    assert scores.tolist() == pytest.approx(expected) and scores[0] > scores[1]
    assert rewards.load("jpeg-incompressibility")(images).tolist() == pytest.approx([-e for e in expected])
    assert not rewards.load("jpeg-compressibility").info.differentiable
