"""``imgalign sample``: files written, diffusers parity through PNG, edit inputs, LoRA, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline

import pipelines
from imgalign.cli import main
from imgalign.images import load_image, save_png
from pipelines.architectures import build_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "pipe"
    build_pipeline("sd15", "tiny", seed=0).save_pretrained(path)
    return path


def _reference(pipe_dir, prompt, seed, **kwargs):
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kwargs).images[0]


def test_sample_writes_pngs_jsonl_grid_and_matches_the_pipeline(sd_dir, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\nthree blue squares\n")
    code = main([
        "sample", "--pipeline", str(sd_dir), "--prompts", str(prompts), "--num-images", "2", "--steps", "4",
        "--guidance", "5", "--seed", "7", "--height", "32", "--width", "32", "--batch-size", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert [r["seed"] for r in records] == [7, 8, 9, 10]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["three blue squares"] * 2
    assert all(r["steps"] == 4 and r["guidance"] == 5.0 for r in records)
    assert (out / "grid.png").is_file()
    # Image i uses Generator("cpu").manual_seed(seed + i): image 2 equals the pipeline with seed 9.
    expected = _reference(sd_dir, "three blue squares", 9, num_inference_steps=4, guidance_scale=5.0, height=32, width=32)
    got = load_image(out / "0002.png")[0]
    assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_sample_edit_pipeline_takes_image_and_instruction(tmp_path):
    pipe_dir = tmp_path / "ip2p"
    build_pipeline("instruct-pix2pix", "tiny").save_pretrained(pipe_dir)
    source = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_png(source, tmp_path / "src.png")
    out = tmp_path / "out"
    code = main([
        "sample", "--pipeline", str(pipe_dir), "--image", str(tmp_path / "src.png"),
        "--instruction", "make it blue", "--steps", "3", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "make it blue", image=load_image(tmp_path / "src.png"), num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
    ).images[0]  # fmt: skip
    assert (load_image(out / "0000.png")[0] - expected).abs().max() <= 1 / 255 + 1e-6


def test_sample_with_lora_changes_the_images(sd_dir, tmp_path):
    adapter = pipelines.load(str(sd_dir))
    pipelines.add_lora(adapter, rank=4)
    with torch.no_grad():
        for p in pipelines.lora_parameters(adapter):
            p.add_(0.3)
    pipelines.save_lora(adapter, tmp_path / "lora")
    common = ["sample", "--pipeline", str(sd_dir), "--prompt", "a red circle", "--steps", "3", "--height", "32", "--width", "32"]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "tuned")]) == 0
    base, tuned = load_image(tmp_path / "base" / "0000.png"), load_image(tmp_path / "tuned" / "0000.png")
    assert (base - tuned).abs().max() > 5 / 255


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_dir", "pipeline directory not found"),
        ("unknown_class", "is not supported"),
        ("bad_size", "divisible by 8"),
        ("empty_prompts", "prompt file is empty"),
        ("no_prompt", "give --prompt"),
    ],
)
def test_bad_input_exits_with_one_clear_line(sd_dir, tmp_path, capsys, case, message):
    pipe = str(sd_dir)
    extra = ["--prompt", "a red circle"]
    if case == "missing_dir":
        pipe = str(tmp_path / "nope")
    elif case == "unknown_class":
        (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
        pipe = str(tmp_path)
    elif case == "bad_size":
        extra += ["--height", "36"]
    elif case == "empty_prompts":
        (tmp_path / "p.txt").write_text("\n  \n")
        extra = ["--prompts", str(tmp_path / "p.txt")]
    elif case == "no_prompt":
        extra = []
    code = main(["sample", "--pipeline", pipe, *extra, "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("imgalign sample: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_the_installed_command_prints_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "imgalign.cli", "sample", "--pipeline", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"imgalign sample: error: --pipeline: pipeline directory not found: {tmp_path / 'missing'}"]
