"""The Shapes edit model (InstructPix2Pix in the Shapes world), its training, and the edit reward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines
from imgalign.shapes.edit import (
    T2I_DIR,
    build_edit_pipeline,
    edit_tokenizer,
    evaluate_edit,
    instruction_vocabulary,
    make_edit_dataset,
    train_edit,
)
from imgalign.shapes.edit_reward import make_edit_preference_data, shapes_edit_reward, training_config
from imgalign.shapes.t2i import shapes_tokenizer
from pipelines import ShapesEditAdapter, ShapesEditPipeline, ShapesPipeline

INSTRUCTIONS = ["make the circle red", "move the square to the left"]
TINY = 16


def _generators(seed: int = 0, n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _sources(n: int = 2, seed: int = 3) -> torch.Tensor:
    images = make_edit_dataset(n, seed).sources
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def tiny_edit_dir(tmp_path_factory) -> str:
    """A tiny random ShapesEditPipeline on 16x16 images (fp32), saved with save_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = edit_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=TINY, in_channels=8, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=48, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = ShapesEditPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    path = tmp_path_factory.mktemp("tiny") / "edit"
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained_edit_dir(tmp_path_factory) -> str:
    """Three training steps from the shipped T2I model on a tiny batch."""
    out = tmp_path_factory.mktemp("trained") / "edit"
    return str(train_edit(out, steps=3, batch_size=2, seed=0, log_every=1))


# --------------------------------------------------------------------------- tokenizer


def test_edit_tokenizer_keeps_caption_ids_and_knows_every_instruction_word():
    t2i, edit = shapes_tokenizer(), edit_tokenizer()
    t2i_vocab, edit_vocab = t2i.get_vocab(), edit.get_vocab()
    assert all(edit_vocab[word] == i for word, i in t2i_vocab.items())
    new_words = sorted(edit_vocab, key=edit_vocab.get)[len(t2i_vocab) :]
    assert new_words == sorted(new_words) == list(instruction_vocabulary())
    assert {"make", "move", "remove", "add", "to", "larger", "smaller"} <= set(new_words)
    examples = make_edit_dataset(200, seed=1)
    caption = "a small red circle on the left and a large blue square on the right on a white background"
    assert edit(caption).input_ids == t2i(caption).input_ids
    for instruction in examples.instructions:
        assert edit.unk_token_id not in edit(instruction).input_ids, instruction


# --------------------------------------------------------------------------- pipeline and adapter


def test_adapter_sampling_equals_pipeline_call(tiny_edit_dir):
    adapter = pipelines.load(tiny_edit_dir, dtype=torch.float32)
    assert isinstance(adapter, ShapesEditAdapter) and adapter.family == "shapes-edit" and adapter.is_edit
    pipe = ShapesEditPipeline.from_pretrained(tiny_edit_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    source = torch.rand(2, 3, TINY, TINY, generator=torch.Generator().manual_seed(1))
    for text_scale, image_scale in ((4.0, 1.5), (1.0, 1.5)):  # IP2P's three branches, then no guidance
        expected = pipe(
            INSTRUCTIONS, image=source, num_inference_steps=3, guidance_scale=text_scale,
            image_guidance_scale=image_scale, generator=_generators(), output_type="pt",
        ).images  # fmt: skip
        images = adapter.sample(
            INSTRUCTIONS, image=source, num_steps=3, guidance_scale=text_scale, image_guidance_scale=image_scale,
            generator=_generators(),
        )  # fmt: skip
        assert images.shape == (2, 3, TINY, TINY) and 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
    other = adapter.sample(INSTRUCTIONS, image=source.flip(0), num_steps=3, guidance_scale=1.0, generator=_generators())
    assert (other - images).abs().max() > 1e-3  # the source image reaches the model

    # detach_uncond runs the text-free branches without gradient: same guided velocity
    cond = adapter.encode_prompt(INSTRUCTIONS, guidance_scale=4.0, image=source, image_guidance_scale=1.5)
    schedule = adapter.schedule(3)
    latents = adapter.prepare_latents(2, TINY, TINY, _generators())
    with torch.no_grad():
        batched = adapter.predict(latents, schedule, 1, cond)
        detached = adapter.predict(latents, schedule, 1, cond, detach_uncond=True)
    torch.testing.assert_close(batched, detached, atol=1e-5, rtol=0)


def test_edit_model_initialised_from_t2i_predicts_the_t2i_velocity():
    """InstructPix2Pix's initialisation: zero source-channel weights, so the T2I model is unchanged."""
    edit = build_edit_pipeline(seed=0, init_from=T2I_DIR)
    t2i = ShapesPipeline.from_pretrained(str(T2I_DIR), torch_dtype=torch.float32)
    conv, t2i_conv = edit.unet.conv_in.weight, t2i.unet.conv_in.weight
    assert conv.shape[1] == 8 and torch.all(conv[:, 3:6] == 0)
    assert torch.equal(conv[:, :3], t2i_conv[:, :3]) and torch.equal(conv[:, 6:], t2i_conv[:, 3:])
    new_rows = edit.text_encoder.get_input_embeddings().weight[-len(instruction_vocabulary()) :].detach()
    assert new_rows.shape[0] == edit.text_encoder.config.vocab_size - t2i.text_encoder.config.vocab_size
    assert 0.7 < float(new_rows.std()) < 1.3
    captions = ["a large red circle in the centre on a white background", ""]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(600.0)
    with torch.no_grad():
        expected = t2i.velocity(x, t, t2i._encode(captions, "cpu"))
        text = edit._encode(captions, "cpu")
        zero_source = edit.velocity(x, t, text, torch.zeros_like(x))
        any_source = edit.velocity(x, t, text, _sources() * 2 - 1)
    torch.testing.assert_close(zero_source, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(any_source, expected, atol=1e-5, rtol=0)


def test_train_edit_saves_a_pipeline_that_loads_samples_and_evaluates(trained_edit_dir):
    index = json.loads((Path(trained_edit_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesEditPipeline"
    adapter = pipelines.load(trained_edit_dir, dtype=torch.float32)
    assert adapter.family == "shapes-edit"
    assert adapter.denoiser.conv_in.weight[:, 3:6].abs().max() > 0  # the source channels learned something
    images = adapter.sample(INSTRUCTIONS, image=_sources(), num_steps=2, guidance_scale=3.0, generator=_generators())
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    metrics = evaluate_edit(trained_edit_dir, n=2, steps=2)
    assert metrics["n"] == 2
    assert all(0 <= metrics[k] <= 1 for k in ("overall", "edit_applied", "preserved", "exact"))


# --------------------------------------------------------------------------- reward and data


def test_edit_reward_gradient_reaches_the_edited_image_and_features_are_reproducible():
    reward = shapes_edit_reward()
    assert reward.info.inputs == ("images", "prompts", "source_images")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    source = _sources()
    score = reward(images, INSTRUCTIONS, source_images=source)
    assert score.shape == (2,)
    score.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        features = reward.features(images, INSTRUCTIONS, source_images=source)
        again = shapes_edit_reward().features(images, INSTRUCTIONS, source_images=source)
    assert features.shape == (2, 5 * 64)
    torch.testing.assert_close(features, again)  # a head trained over frozen features reloads exactly
    swapped = reward.encode_instruction(["make the red circle blue", "make the blue circle red"])
    assert not torch.allclose(swapped[0], swapped[1], atol=1e-4)  # word order matters


def test_edit_preference_data_loads_and_trains_a_reward_head(trained_edit_dir, tmp_path, monkeypatch):
    import rewards
    import rewards.registry
    from imgalign.train.config import from_dict
    from imgalign.train.reward_model import RewardModelTrainingConfig
    from imgalign.train.run import train
    from rewards.training import PairDataConfig, load_pairs

    path = make_edit_preference_data(tmp_path / "pairs", n=2, seed=0, pipeline=trained_edit_dir, num_steps=2)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 * 6  # 4 candidates per source: target, unchanged, wrong edit, one model sample
    pairs = load_pairs(str(path), PairDataConfig(image_size=32))
    assert len(pairs) == len(records)
    assert all(p.source is not None and p.source.shape == (3, 32, 32) and p.prompt for p in pairs)
    for record, pair in zip(records, pairs, strict=True):
        kinds = record["kinds"]
        if sorted(kinds) == ["target", "unchanged"]:
            assert pair.target == (1.0 if kinds[0] == "target" else 0.0)  # the exact render wins
            assert {record["utility_a"], record["utility_b"]} == {0.0, 1.0}

    monkeypatch.setitem(rewards.registry._REGISTRY, "shapes-edit-reward-base", shapes_edit_reward)
    config = training_config(str(path), str(path), str(tmp_path / "run"), steps=2, mode="head")
    config["train"]["batch_size"] = 4
    out = train(from_dict(RewardModelTrainingConfig, config)).weights_dir
    trained = rewards.load(str(out))
    scores = trained(_sources(), INSTRUCTIONS, source_images=_sources().flip(0))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert np.isfinite(json.loads((tmp_path / "run" / "final_metrics.json").read_text())["val_accuracy"])
