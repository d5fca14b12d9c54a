"""``imgalign score`` run directly with tiny rewards."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from imgalign.commands import CommandError
from imgalign.commands import score as score_cmd
from rewards import Reward, RewardInfo


class MeanRed(Reward):
    info = RewardInfo(name="mean-red", inputs=("images", "prompts"), source="test", mean=0.5, std=0.25)

    def _score(self, images, prompts, **cond):
        return images[:, 0].mean((1, 2)) + 0.01 * torch.tensor([len(p) for p in prompts], device=images.device)


class RefL1(Reward):
    info = RewardInfo(name="ref-l1", inputs=("images", "reference_images"), source="test", mean=0.0, std=1.0)

    def _score(self, images, prompts, reference_images):
        return (images - reference_images).abs().mean((1, 2, 3))


def parse(argv):
    p = argparse.ArgumentParser()
    score_cmd.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(16, 16), (16, 16), (20, 12)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_score_command_single_and_composite(image_dir, tmp_path):
    rewards.register("mean-red", MeanRed, overwrite=True)
    rewards.register("ref-l1", RefL1, overwrite=True)
    assert isinstance(score_cmd.HELP, str)
    out = tmp_path / "out.jsonl"
    rc = score_cmd.run(parse(["--reward", "mean-red", "--images", str(image_dir), "--prompt", "abc",
                              "--batch-size", "2", "--device", "cpu", "--out", str(out)]))
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"].rsplit("/", 1)[-1] for r in recs] == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert "error" in recs[0] and "scores" not in recs[0]
    for r in recs[1:]:
        arr = np.asarray(Image.open(r["file"]).convert("RGB"), dtype=np.float32) / 255
        assert r["scores"]["mean-red"] == pytest.approx(arr[..., 0].mean() + 0.03, abs=1e-5)
        assert r["total"] == pytest.approx(r["scores"]["mean-red"], abs=1e-6)
        assert r["prompt"] == "abc"
    # composite with references matched by file name, prompts from a file
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    for f in image_dir.glob("img*.png"):
        Image.open(f).save(ref_dir / f.name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nbb\nccc\ndddd\n")
    out2 = tmp_path / "out2.jsonl"
    score_cmd.run(parse(["--reward", "mean-red=2,ref-l1=-1", "--images", str(image_dir / "*.png"), "--prompts",
                         str(prompts), "--reference-images", str(ref_dir), "--out", str(out2)]))
    recs = [json.loads(line) for line in out2.read_text().splitlines()]
    assert recs[0]["error"]
    for r in recs[1:]:
        assert r["scores"]["ref-l1"] == pytest.approx(0.0, abs=1e-6)
        assert r["total"] == pytest.approx(2 * (r["scores"]["mean-red"] - 0.5) / 0.25, abs=1e-5)
    assert [r["prompt"] for r in recs] == ["a", "bb", "ccc", "dddd"]


def test_score_command_errors(image_dir, tmp_path):
    rewards.register("mean-red", MeanRed, overwrite=True)
    rewards.register("ref-l1", RefL1, overwrite=True)
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(CommandError, match="needs --prompt"):
        score_cmd.run(parse(["--reward", "mean-red", "--images", str(image_dir), "--out", out]))
    with pytest.raises(CommandError, match="--reference-images"):
        score_cmd.run(parse(["--reward", "ref-l1", "--images", str(image_dir), "--out", out]))
    with pytest.raises(CommandError, match="no images"):
        score_cmd.run(parse(["--reward", "mean-red", "--images", str(tmp_path / "none"), "--prompt", "x", "--out", out]))
    with pytest.raises(CommandError, match="unknown reward"):
        score_cmd.run(parse(["--reward", "nope", "--images", str(image_dir), "--prompt", "x", "--out", out]))
    with pytest.raises(CommandError, match="exactly one"):
        score_cmd.run(parse(["--reward", "a,b", "--checkpoint", "x", "--images", str(image_dir), "--out", out]))
    bad = tmp_path / "p.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(CommandError, match="2 prompts for 4 images"):
        score_cmd.run(parse(["--reward", "mean-red", "--images", str(image_dir), "--prompts", str(bad), "--out", out]))


def test_score_command_with_saved_tiny_model(image_dir, tmp_path):
    """A real reward family (HPSv2 at tiny size) from a reward.json + checkpoint on disk."""
    from rewards.clip_score import build_open_clip

    tiny = {"embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model, _ = build_open_clip(tiny, load_weights=False)
    d = tmp_path / "tiny_hps"
    d.mkdir()
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2.1_compressed.pt")
    (d / "reward.json").write_text(json.dumps({"name": "hpsv2.1", "options": {"arch": tiny, "checkpoint": "./"}}))
    out = tmp_path / "hps.jsonl"
    score_cmd.run(parse(["--reward", str(d / "reward.json"), "--images", str(image_dir), "--prompt", "a photo",
                         "--out", str(out)]))
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4 and "error" in recs[0]
    direct = rewards.load(str(d))  # the directory form of the same description
    img = torch.from_numpy(np.asarray(Image.open(recs[1]["file"]).convert("RGB"), dtype=np.float32) / 255)
    expect = float(direct(img.permute(2, 0, 1)[None], "a photo"))
    (name,) = recs[1]["scores"]
    assert recs[1]["scores"][name] == pytest.approx(expect, abs=1e-5)


def test_score_with_an_option_the_reward_does_not_take_names_the_options_it_does(image_dir, tmp_path, capsys):
    """``imgalign score --reward lpips --checkpoint X``: one line naming the reward and its options, exit 2."""
    from imgalign.cli import main

    rewards.register("mean-red", MeanRed, overwrite=True)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    out = tmp_path / "o.jsonl"
    common = ["--images", str(image_dir), "--reference-images", str(image_dir), "--prompt", "x", "--device", "cpu",
              "--out", str(out)]  # fmt: skip

    def one_line_error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("imgalign score: error:"), err
        return err

    # a built-in reward whose factory forwards **options to its class (LPIPSReward)
    err = one_line_error(["score", "--reward", "lpips", "--checkpoint", str(weights), *common])
    assert "'lpips'" in err and "'checkpoint'" in err and "unexpected keyword" not in err
    assert "backbone_weights" in err and "net" in err
    # a reward whose class takes no options at all
    err = one_line_error(["score", "--reward", "mean-red", "--checkpoint", str(weights), *common])
    assert "'mean-red'" in err and "'checkpoint'" in err and "takes no options" in err
    # a reward.json with a misspelt option, for a factory that forwards to ``from_options``
    spec = tmp_path / "reward.json"
    spec.write_text(json.dumps({"name": "clip-t", "options": {"chekpoint": "./weights.pth"}}))
    err = one_line_error(["score", "--reward", str(spec), *common])
    assert "'clip-t'" in err and "'chekpoint'" in err and "checkpoint," in err and "arch" in err
    assert not out.exists()


def test_load_reports_unknown_options_but_not_a_factorys_own_type_errors():
    def broken(**options):
        raise TypeError("a bug inside the factory")

    rewards.register("test-broken-factory", broken, overwrite=True)
    with pytest.raises(TypeError, match="a bug inside the factory"):
        rewards.load("test-broken-factory", anything=1)
    with pytest.raises(ValueError, match=r"reward 'lpips-sim' does not take the option 'checkpoint'.*net"):
        rewards.load("lpips-sim", checkpoint="x")
    with pytest.raises(ValueError, match=r"reward 'clip' does not take the option 'bogus'"):
        rewards.load({"clip": 1.0, "lpips": 1.0}, clip={"bogus": 1})
