"""Published architectures, tiny and full: build offline, run, save/reload, parameter counts."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from pipelines.architectures import (
    FAMILIES,
    PUBLISHED_DENOISER_PARAMS,
    build_denoiser,
    build_pipeline,
    count_parameters,
    random_prompt_embeds,
)

SIZE = 64  # image side; vae_scale_factor is 8 at tiny size too, so latents are 8x8
EDIT_FAMILIES = ("instruct-pix2pix", "flux-kontext")


def _call_kwargs(family: str, seed: int = 0) -> dict:
    kwargs = dict(
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    )
    if family in EDIT_FAMILIES:
        kwargs["image"] = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator("cpu").manual_seed(1))
    if family == "flux-kontext":
        # Kontext rescales to max_area (default 1024^2) and snaps the input to its preferred resolutions.
        kwargs.update(max_area=SIZE * SIZE, _auto_resize=False)
    return kwargs


def _run(pipe: DiffusionPipeline, family: str, **extra) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**_call_kwargs(family), **extra).images


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_runs_and_roundtrips(family: str, tmp_path):
    pipe = build_pipeline(family, "tiny", seed=0)
    images = _run(pipe, family, prompt="a red cat")
    assert images.shape == (1, 3, SIZE, SIZE)
    assert torch.isfinite(images).all()

    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded) is type(pipe)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.scheduler.config) == public(pipe.scheduler.config)
    reloaded.set_progress_bar_config(disable=True)
    again = _run(reloaded, family, prompt="a red cat")
    torch.testing.assert_close(again, images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizers_match_text_encoders(family: str):
    pipe = build_pipeline(family, "tiny")
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is None:
            continue
        assert encoder.config.vocab_size == len(tokenizer)
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_embeddings_without_text_encoders(family: str):
    pipe = build_pipeline(family, "tiny", text_encoders=False)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    embeds = random_prompt_embeds(family, pipe, batch_size=2, seed=3)
    for value in embeds.values():
        assert value.shape[0] == 2 and value.dtype == torch.float32
    kwargs = _call_kwargs(family)
    if "image" in kwargs:
        kwargs["image"] = kwargs["image"].expand(2, -1, -1, -1)
    with torch.no_grad():
        images = pipe(**kwargs, **embeds).images
    assert images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_build_is_deterministic():
    a, b, c = (build_pipeline("sdxl", "tiny", seed=s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_dtype_is_applied():
    pipe = build_pipeline("flux", "tiny", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    embeds = random_prompt_embeds("flux", pipe, 1)
    assert all(v.dtype == torch.bfloat16 for v in embeds.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_denoiser_parameter_count(family: str):
    model = build_denoiser(family, "full", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(model) == pytest.approx(PUBLISHED_DENOISER_PARAMS[family], rel=0.03)


FULL_EMBED_SHAPES = {
    "sd15": {"prompt_embeds": (2, 77, 768)},
    "sd2-v": {"prompt_embeds": (2, 77, 1024)},
    "instruct-pix2pix": {"prompt_embeds": (2, 77, 768)},
    "sdxl": {"prompt_embeds": (2, 77, 2048), "pooled_prompt_embeds": (2, 1280)},
    "sd3": {"prompt_embeds": (2, 333, 4096), "pooled_prompt_embeds": (2, 2048)},
    "flux": {"prompt_embeds": (2, 512, 4096), "pooled_prompt_embeds": (2, 768)},
    "flux-kontext": {"prompt_embeds": (2, 512, 4096), "pooled_prompt_embeds": (2, 768)},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_pipeline_constructs_on_meta(family: str):
    pipe = build_pipeline(family, "full", device="meta", dtype=torch.bfloat16)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert denoiser.device.type == "meta" and denoiser.dtype == torch.bfloat16
    embeds = random_prompt_embeds(family, pipe, batch_size=2)
    for key, shape in FULL_EMBED_SHAPES[family].items():
        assert tuple(embeds[key].shape) == shape
        if f"negative_{key}" in embeds:
            assert embeds[f"negative_{key}"].shape == embeds[key].shape
    assert all(v.dtype == torch.bfloat16 for v in embeds.values())


def test_unknown_family_and_size():
    with pytest.raises(ValueError):
        build_pipeline("sd4")
    with pytest.raises(ValueError):
        build_pipeline("sd15", "medium")
    with pytest.raises(ValueError):
        build_pipeline("sd15", "full", text_encoders=True)
