"""Reward-model training: a tiny CLIP learns a known preference; resume is exact; outputs reload."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import rewards
from imgalign.cli import main
from rewards.training import PairDataConfig, evaluate_pairs, load_pairs

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def redness(a: np.ndarray) -> float:
    return float(a[..., 0].mean() - a[..., 1:].mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pairs of noisy solid colours; the redder image is preferred (a known, learnable truth)."""
    from safetensors.torch import save_file

    from rewards.clip_score import build_open_clip

    root = tmp_path_factory.mktemp("reward-train")
    torch.manual_seed(0)
    model, _ = build_open_clip(TINY, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny_clip.safetensors"))
    rng = np.random.default_rng(0)
    (root / "img").mkdir()

    def make(n, name):
        lines = []
        for i in range(n):
            while True:
                arrs = [np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                        for _ in range(2)]
                r = [redness(a / 255) for a in arrs]
                if abs(r[0] - r[1]) > 0.05:
                    break
            for j, a in enumerate(arrs):
                Image.fromarray(a).save(root / "img" / f"{name}{i}_{j}.png")
            lines.append({"image_a": f"img/{name}{i}_0.png", "image_b": f"img/{name}{i}_1.png",
                          "prompt": "a red picture", "label": "A" if r[0] > r[1] else "B",
                          "labels": {"red": "A" if r[0] > r[1] else "B"}})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    make(160, "train")
    make(48, "val")
    return root


def config(root: Path, out: Path, **sections) -> Path:
    cfg = {
        "output_dir": str(out),
        "data": {"train": str(root / "train.jsonl"), "val": str(root / "val.jsonl"), "image_size": 32},
        "model": {"reward": {"name": "clip", "options": {"arch": TINY, "pretrained": None,
                                                          "checkpoint": str(root / "tiny_clip.safetensors")}},
                  "mode": "head"},
        "optim": {"lr": 0.003},
        "train": {"batch_size": 16, "max_steps": 120, "checkpoint_every": 60, "report_to": []},
        "validation": {"every": 60},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_head_on_frozen_clip_learns_redness(data, tmp_path):
    out = tmp_path / "run"
    assert main(["train-reward", "--config", str(config(data, out))]) == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["val_accuracy"] >= 0.85, metrics
    # the output directory is a reward: same held-out accuracy after a reload
    reward = rewards.load(str(out / "reward"))
    assert isinstance(reward, rewards.training.TrainableReward)
    val = load_pairs(str(data / "val.jsonl"), PairDataConfig(image_size=32))
    reloaded = evaluate_pairs(reward, val, 32, torch.device("cpu"))
    assert reloaded["accuracy"] == pytest.approx(metrics["val_accuracy"])
    # only the head was trained and saved
    saved = load_file(str(out / "reward" / "model.safetensors"))
    assert saved and all(k.startswith("head.") for k in saved)
    # and it scores through the Reward contract, differentiably
    x = torch.rand(2, 3, 24, 24, requires_grad=True)
    reward(x, ["a red picture"] * 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_resume_is_exact(data, tmp_path):
    small = {"train": {"batch_size": 8, "max_steps": 6, "gradient_accumulation_steps": 2, "checkpoint_every": 3,
                       "report_to": []},
             "optim": {"lr": 0.003, "warmup_steps": 2},
             "validation": {"every": 100}}
    full = tmp_path / "full"
    assert main(["train-reward", "--config", str(config(data, full, **small))]) == 0
    part = tmp_path / "part"
    cfg = config(data, part, **small)
    assert main(["train-reward", "--config", str(cfg), "--stop-after-steps", "4"]) == 0  # "killed" after step 4
    assert (part / "checkpoints" / "checkpoint-000004").is_dir() and not (part / "reward").exists()
    assert main(["train-reward", "--config", str(cfg), "--resume", "latest"]) == 0
    a = load_file(str(full / "reward" / "model.safetensors"))
    b = load_file(str(part / "reward" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert _losses(part) == _losses(full) and len(_losses(full)) == 6


def test_train_reward_is_the_reward_method_of_imgalign_train(data, tmp_path, capsys):
    """One skeleton, one vocabulary: `train reward` == `train-reward`; old keys name their new place."""
    small = {"train": {"batch_size": 8, "max_steps": 2, "report_to": []}, "validation": {"every": 0}}
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train-reward", "--config", str(config(data, a, **small))]) == 0
    assert main(["train", "reward", "--config", str(config(data, b, **small))]) == 0
    assert _losses(a) == _losses(b)
    assert (a / "config.yaml").is_file() and "method: reward" in (a / "config.yaml").read_text()
    capsys.readouterr()
    for old, new in (("optim.grad_accum=2", "train.gradient_accumulation_steps"), ("run.resume=auto", "--resume"),
                     ("model.lora_rank=4", "lora.rank"), ("optim.batch_size=4", "train.batch_size")):  # fmt: skip
        assert main(["train-reward", "--config", str(config(data, tmp_path / "old", **small)), old]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and old.split("=")[0] in err[0] and new in err[0], err


def test_lora_with_uncertainty_head_and_aspects(data, tmp_path):
    out = tmp_path / "lora"
    cfg = config(data, out, model={"mode": "lora", "new_head": True, "outputs": "uncertainty", "aspects": ["red"]},
                 lora={"rank": 2},
                 loss={"kind": "uncertainty", "estimator": "monte-carlo", "num_samples": 64},
                 train={"batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "report_to": []},
                 validation={"every": 2})
    assert main(["train-reward", "--config", str(cfg)]) == 0
    saved = load_file(str(out / "reward" / "model.safetensors"))
    assert any("lora_A" in k for k in saved) and any(k.startswith("head.") for k in saved)
    reward = rewards.load(str(out / "reward"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        outputs = reward.outputs(x, ["a red picture"] * 2)
        assert outputs.shape == (2, 1, 2)  # one aspect, (mu, log_sigma)
        torch.testing.assert_close(reward(x, ["a red picture"] * 2), outputs[..., 0].mean(1))


def test_bad_config_is_one_line(data, tmp_path, capsys):
    assert main(["train-reward", "--config", str(config(data, tmp_path / "bad")), "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0]


def test_train_from_parquet_paths_and_bytes(data, tmp_path):
    """Training pairs from Parquet: images as relative paths and as bytes load as from JSONL."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), str(data / "train.parquet"))  # paths relative to data/
    as_bytes = [{**r, "image_a": (data / r["image_a"]).read_bytes(), "image_b": (data / r["image_b"]).read_bytes()}
                for r in records]
    as_bytes[0]["label"] = None  # an unlabelled pair: None in Parquet, like a missing key in JSONL
    pq.write_table(pa.Table.from_pylist(as_bytes), str(tmp_path / "train_bytes.parquet"))
    cfg = PairDataConfig(image_size=32)
    reference = load_pairs(str(data / "train.jsonl"), cfg, ["red"])
    for path in (data / "train.parquet", tmp_path / "train_bytes.parquet"):
        pairs = load_pairs(str(path), cfg, ["red"])
        assert len(pairs) == len(reference)
        for p, q in zip(pairs, reference):
            torch.testing.assert_close(p.image_a, q.image_a, rtol=0, atol=0)
            torch.testing.assert_close(p.image_b, q.image_b, rtol=0, atol=0)
            assert (p.prompt, p.aspect_targets) == (q.prompt, q.aspect_targets)
    assert np.isnan(pairs[0].target) and pairs[1].target == reference[1].target
    out = tmp_path / "pq"
    cfg_file = config(data, out, data={"train": str(tmp_path / "train_bytes.parquet")},
                      train={"batch_size": 8, "max_steps": 2, "checkpoint_every": 2, "report_to": []},
                      validation={"every": 2})
    assert main(["train-reward", "--config", str(cfg_file)]) == 0
    assert isinstance(rewards.load(str(out / "reward")), rewards.training.TrainableReward)


def test_eval_reward_batched_equals_unbatched(data, tmp_path):
    """Images scored in size groups give the same report as one image at a time (and Parquet as JSONL)."""
    (data / "reward.json").write_text(json.dumps({"name": "clip", "options": {
        "arch": TINY, "pretrained": None, "checkpoint": "./tiny_clip.safetensors"}}))
    rng = np.random.default_rng(1)
    records = [json.loads(x) for x in (data / "val.jsonl").read_text().splitlines()][:12]
    for g in range(3):  # ranked groups of images of several sizes, with human scores
        names = []
        for j, size in enumerate((16, 20, 24)):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(data / "img" / f"g{g}_{j}.png")
            names.append(f"img/g{g}_{j}.png")
        records.append({"images": names, "prompt": "a red picture", "ranking": "C>A>B", "human_scores": [2.0, 1.0, 3.0]})
    (data / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    reports = {}
    runs = {"one": ("eval.jsonl", 1), "batched": ("eval.jsonl", 7)}
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for r in records for k in r))
        rows = [{k: r.get(k) for k in columns} for r in records]  # absent fields are None in Parquet
        pq.write_table(pa.Table.from_pylist(rows), str(data / "eval.parquet"))
        runs["parquet"] = ("eval.parquet", 16)
    for name, (file, batch) in runs.items():
        out = tmp_path / name
        assert main(["eval-reward", "--reward", str(data / "reward.json"), "--data", str(data / file),
                     "--batch-size", str(batch), "--device", "cpu", "--out", str(out)]) == 0
        reports[name] = json.loads((out / "report.json").read_text())
        reports[name]["scores"] = [json.loads(x)["scores"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    one = reports.pop("one")
    assert one["pairs"] == 12 + 3 * 3 and one["group_accuracy"]["3"]["groups"] == 3
    for name, report in reports.items():
        for key in ("records", "pairs", "pairwise_accuracy", "accuracy_with_ties", "human_ties", "group_accuracy",
                    "spearman", "kendall_tau", "scored_items"):
            assert report[key] == one[key], (name, key)
        for key in ("tie_epsilon", "bt_log_loss", "ece"):
            assert report[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (name, key)
        assert np.allclose(sum(report["scores"], []), sum(one["scores"], []), rtol=1e-5, atol=1e-6), name
