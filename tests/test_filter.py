"""``imgalign filter``: every item accounted for, resume after an interruption, two processes = one."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.cli import main
from imgalign.curation import FAULT_ENV, InjectedFault, read_parts, select

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "a blue square", "a green triangle"]
N_GOOD = 21


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny CLIP reward.json and a JSONL dataset with 21 good items, a missing and a corrupt image."""
    from safetensors.torch import save_file

    from rewards.clip_score import build_open_clip

    root = tmp_path_factory.mktemp("filter")
    torch.manual_seed(0)
    model, _ = build_open_clip(TINY, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny_clip.safetensors"))
    (root / "reward.json").write_text(json.dumps(
        {"name": "clip", "options": {"arch": TINY, "pretrained": None, "checkpoint": "./tiny_clip.safetensors"}}))
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(N_GOOD):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        lines.append({"image": f"images/{i}.png", "prompt": PROMPTS[i % 3], "id": i})
    (root / "images" / "corrupt.png").write_bytes(b"not a png")
    lines.insert(5, {"image": "images/missing.png", "prompt": PROMPTS[0], "id": "missing"})
    lines.insert(9, {"image": "images/corrupt.png", "prompt": PROMPTS[1], "id": "corrupt"})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def args(root, out, *extra):
    return ["filter", "--data", str(root / "items.jsonl"), "--reward", str(root / "reward.json"),
            "--top-fraction", "0.5", "--per", "prompt", "--batch-size", "2", "--device", "cpu", "--out", str(out),
            *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(dataset):
    out = dataset / "uninterrupted"
    assert main(args(dataset, out)) == 0
    return out


def test_every_item_has_a_score_or_an_error(dataset, reference):
    rows = read_jsonl(reference / "scores.jsonl")
    assert [r["index"] for r in rows] == list(range(N_GOOD + 2))
    errors = {r["index"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {5, 9}
    assert "does not exist" in errors[5] and "not an image PIL can read" in errors[9]
    assert all(isinstance(r["score"], float) for r in rows if "error" not in r)
    # top half per prompt: 7 scored items per prompt -> ceil(3.5) = 4 kept each
    kept = read_jsonl(reference / "kept.jsonl")
    assert len(kept) == 12 and all(r["id"] not in ("missing", "corrupt") for r in kept)
    for prompt in PROMPTS:
        scores = sorted((r["score"] for r in rows if r.get("prompt") == prompt and "score" in r), reverse=True)
        kept_scores = sorted((r["score"] for r in rows if r.get("prompt") == prompt and r["kept"]), reverse=True)
        assert kept_scores == scores[:4]
    # kept records are the input records, with paths that resolve from the output directory
    assert all((reference / r["image"]).is_file() for r in kept)
    assert (reference / "histogram.png").stat().st_size > 1000
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["items"], summary["errors"], summary["kept"]) == (N_GOOD + 2, 2, 12)


def test_select_threshold_and_global_fraction():
    results = {0: {"score": 1.0}, 1: {"score": 3.0}, 2: {"error": "x"}, 3: {"score": 3.0}, 4: {"score": 2.0}}
    assert select(results, None, threshold=2.0)[0] == {1, 3, 4}
    kept, info = select(results, None, top_fraction=0.5)
    assert kept == {1, 3} and info["cutoff_score"] == 3.0
    assert select(results, None, top_fraction=0.25)[0] == {1}  # tie at the cut: lower index first


def test_bad_input_is_one_line(dataset, tmp_path, capsys):
    assert main(["filter", "--data", str(tmp_path / "nope.jsonl"), "--reward", "clip", "--threshold", "0",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def kept_ids(out):
    return [r["id"] for r in read_jsonl(out / "kept.jsonl")]


def assert_same_results(out, reference):
    ours, ref = read_jsonl(out / "scores.jsonl"), read_jsonl(reference / "scores.jsonl")
    assert [r["index"] for r in ours] == [r["index"] for r in ref]
    for a, b in zip(ours, ref):
        assert a.get("error") == b.get("error") and a["kept"] == b["kept"]
        if "score" in b:
            assert math.isclose(a["score"], b["score"], rel_tol=1e-5, abs_tol=1e-6)
    assert kept_ids(out) == kept_ids(reference)


def committed_parts(out):
    """Each part file by name: its inode (a rewrite replaces it) and its bytes."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in (out / "parts").glob("part-*.jsonl")}


# After 3 parts an error item (5) is among the finished work; after 11 only the last item is left.
@pytest.mark.parametrize("parts_done", [3, 11])
def test_interrupted_run_resumes_to_the_same_output(dataset, reference, tmp_path, monkeypatch, capsys, parts_done):
    out = tmp_path / "interrupted"
    monkeypatch.setenv(FAULT_ENV, str(parts_done))
    with pytest.raises(InjectedFault):  # --debug: the simulated kill propagates instead of becoming one line
        main(args(dataset, out, "--debug"))
    monkeypatch.delenv(FAULT_ENV)
    n_done = 2 * parts_done  # --batch-size 2
    assert sorted(read_parts(out)) == list(range(n_done))
    assert not (out / "scores.jsonl").exists()
    before = committed_parts(out)
    # a kill in the middle of the next write leaves only atomic_write_bytes' temporary file
    (out / "parts" / f".part-{n_done:09d}-{n_done + 1:09d}.jsonl.x1y2z3").write_text('{"index": ')
    capsys.readouterr()

    assert main(args(dataset, out)) == 2  # a used --out needs --resume (or --overwrite)
    assert "--resume" in capsys.readouterr().err
    assert committed_parts(out) == before
    assert main(args(dataset, out, "--resume")) == 0
    n_items = N_GOOD + 2
    resumed = f"resuming: {n_done} of {n_items} item(s) already scored, {n_items - n_done} to go"
    assert resumed in capsys.readouterr().out
    after = committed_parts(out)
    assert {name: after[name] for name in before} == before  # finished work is not redone
    new = {}
    for name in set(after) - set(before):
        new.update({r["index"]: r for r in map(json.loads, (out / "parts" / name).read_text().splitlines())})
    assert sorted(new) == list(range(n_done, n_items))  # the rest is scored exactly once
    read_parts(out)  # raises if any item was scored twice
    assert_same_results(out, reference)


def test_fault_hook_rejects_a_bad_value(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "soon")
    assert main(args(dataset, tmp_path / "o")) == 2
    assert FAULT_ENV in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_keep_the_same_set(dataset, reference, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "imgalign.cli", *args(dataset, out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert_same_results(out, reference)
    parts = read_parts(out)
    assert sorted(parts) == list(range(N_GOOD + 2))


def test_parquet_in_parquet_out(dataset, reference, tmp_path):
    """The same items as Parquet: same scores and kept set, kept.parquet whose paths resolve from --out."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import rewards

    records = read_jsonl(dataset / "items.jsonl")
    for r in records:
        r["id"] = str(r["id"])  # one type per Parquet column
    pq.write_table(pa.Table.from_pylist(records), str(dataset / "items.parquet"))
    out = tmp_path / "pq"
    argv = args(dataset, out)
    argv[argv.index("--data") + 1] = str(dataset / "items.parquet")
    assert main(argv) == 0
    ours, ref = read_jsonl(out / "scores.jsonl"), read_jsonl(reference / "scores.jsonl")
    assert [r["index"] for r in ours] == list(range(N_GOOD + 2))
    for a, b in zip(ours, ref):
        assert a.get("error") == b.get("error") and a["kept"] == b["kept"]
        if "score" in b:
            assert math.isclose(a["score"], b["score"], rel_tol=1e-5, abs_tol=1e-6)
    kept = rewards.data.read_records(out / "kept.parquet")
    assert [r["id"] for r in kept] == [str(i) for i in kept_ids(reference)]
    assert all((out / r["image"]).is_file() for r in kept)


def test_datasets_dir_in_datasets_dir_out(dataset, reference, tmp_path):
    """A save_to_disk directory with an Image column: kept subset saved the same way, input left untouched."""
    datasets = pytest.importorskip("datasets")
    import rewards

    records = [r for r in read_jsonl(dataset / "items.jsonl") if r["id"] not in ("missing", "corrupt")]
    rows = [{"image": str(dataset / r["image"]), "prompt": r["prompt"], "id": r["id"]} for r in records]
    src = tmp_path / "hf"
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).save_to_disk(str(src))
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "hf-out"
    argv = args(dataset, out)
    argv[argv.index("--data") + 1] = str(src)
    assert main(argv) == 0
    assert sorted(p.name for p in src.iterdir()) == before  # no cache files written into the input
    rows = read_jsonl(out / "scores.jsonl")
    assert [r["index"] for r in rows] == list(range(N_GOOD)) and all("score" in r for r in rows)
    ref = {r["index"]: r for r in read_jsonl(reference / "scores.jsonl")}
    ref_index = [i for i in range(N_GOOD + 2) if i not in (5, 9)]
    for r in rows:
        assert math.isclose(r["score"], ref[ref_index[r["index"]]]["score"], rel_tol=1e-5, abs_tol=1e-6)
    kept = datasets.load_from_disk(str(out / "kept"))
    assert isinstance(kept.features["image"], datasets.Image)
    assert kept["id"] == kept_ids(reference)
    assert kept[0]["image"].size == (24, 24)
    assert len(rewards.data.read_records(out / "kept")) == len(kept)
