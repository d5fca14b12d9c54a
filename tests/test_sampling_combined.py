"""Combined generation and AIG: the end points are exactly the base and the tuned model."""

from __future__ import annotations

import json

import pytest
import torch

import pipelines
from imgalign.cli import main
from imgalign.images import load_image
from imgalign.sampling import aig_base_weights, aig_sample, combined_sample
from pipelines.architectures import build_pipeline

SIZE, STEPS = 32, 6
PROMPTS = ["a red circle", "two blue squares"]


def _gens():
    return [torch.Generator("cpu").manual_seed(i) for i in range(2)]


def _perturb_lora(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipelines.lora_parameters(adapter):
            p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["sd15", "sd3"])
def tuned(request):
    """A tiny pipeline with a visibly non-zero LoRA, plus its base and tuned reference images."""
    adapter = pipelines.load(build_pipeline(request.param, "tiny"))
    base_images = adapter.sample(PROMPTS, num_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE, generator=_gens())
    pipelines.add_lora(adapter, rank=4)
    _perturb_lora(adapter)
    tuned_images = adapter.sample(PROMPTS, num_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE, generator=_gens())
    assert (tuned_images - base_images).abs().max() > 1e-3  # the LoRA does something
    return adapter, base_images, tuned_images


def _kwargs():
    return dict(num_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE, generator=_gens())


def test_combined_end_points_are_the_base_and_the_tuned_model(tuned):
    adapter, base_images, tuned_images = tuned
    torch.testing.assert_close(combined_sample(adapter, PROMPTS, switch_step=STEPS, **_kwargs()), base_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(combined_sample(adapter, PROMPTS, switch_step=0, **_kwargs()), tuned_images, atol=1e-6, rtol=0)
    middle = combined_sample(adapter, PROMPTS, switch_step=STEPS // 2, **_kwargs())
    assert (middle - base_images).abs().max() > 1e-4 and (middle - tuned_images).abs().max() > 1e-4
    assert pipelines.has_lora(adapter)  # the LoRA is re-enabled afterwards
    with pytest.raises(ValueError, match="switch_step"):
        combined_sample(adapter, PROMPTS, switch_step=STEPS + 1, **_kwargs())


def test_aig_weights_and_end_points(tuned):
    adapter, base_images, tuned_images = tuned
    assert aig_base_weights(4, 1.0) == [1.0, 0.75, 0.5, 0.25]
    assert aig_base_weights(4, 2.0) == [1 - (i / 4) ** 2 for i in range(4)]
    # p -> infinity: s_i = 1 (all base); p = 0: s_i = 0 (all tuned)
    torch.testing.assert_close(aig_sample(adapter, PROMPTS, power=1e4, **_kwargs()), base_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(aig_sample(adapter, PROMPTS, power=0.0, **_kwargs()), tuned_images, atol=1e-6, rtol=0)


def test_combined_with_a_separate_base_adapter_equals_the_lora_path():
    base = pipelines.load(build_pipeline("sd15", "tiny"))
    tuned_adapter = pipelines.load(build_pipeline("sd15", "tiny"))
    pipelines.add_lora(tuned_adapter, rank=4)
    _perturb_lora(tuned_adapter)
    with_lora = combined_sample(tuned_adapter, PROMPTS, switch_step=3, **_kwargs())
    with_base = combined_sample(tuned_adapter, PROMPTS, switch_step=3, base=base, **_kwargs())
    torch.testing.assert_close(with_lora, with_base, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sample_cli_combined_and_aig(tmp_path):
    pipe_dir, lora_dir = tmp_path / "pipe", tmp_path / "lora"
    build_pipeline("sd15", "tiny").save_pretrained(pipe_dir)
    adapter = pipelines.load(str(pipe_dir))
    pipelines.add_lora(adapter, rank=4)
    _perturb_lora(adapter)
    pipelines.save_lora(adapter, lora_dir)
    common = ["sample", "--pipeline", str(pipe_dir), "--prompt", "a red circle", "--steps", "4", "--height", "32",
              "--width", "32", "--guidance", "4", "--lora", str(lora_dir)]  # fmt: skip
    outs = {}
    for name, extra in {"ode": [], "base": ["--sampler", "combined", "--switch-step", "4"],
                        "combined": ["--sampler", "combined", "--switch-step", "2"],
                        "aig": ["--sampler", "aig", "--aig-power", "2"]}.items():  # fmt: skip
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        outs[name] = load_image(tmp_path / name / "0000.png")
    record = json.loads((tmp_path / "combined" / "samples.jsonl").read_text().splitlines()[0])
    assert record["sampler"] == "combined" and record["switch_step"] == 2
    assert (outs["combined"] - outs["ode"]).abs().max() > 0
    assert (outs["base"] - outs["ode"]).abs().max() > 0
    # without --lora the mixing samplers are a one-line error
    assert main(["sample", "--pipeline", str(pipe_dir), "--prompt", "x", "--sampler", "aig", "--out", str(tmp_path / "e")]) == 2
