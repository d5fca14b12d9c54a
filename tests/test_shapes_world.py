"""The Shapes world and its oracle: the oracle must be right on truth and catch every lie."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from imgalign.shapes import (
    COLOURS,
    HELDOUT_PAIRS,
    KINDS,
    PALETTE,
    POSITIONS,
    Judgement,
    LayoutError,
    Scene,
    Shape,
    caption,
    judge,
    judge_edit,
    judge_scenes,
    make_dataset,
    parse_caption,
    parse_instruction,
    prompt_set,
    render,
    render_batch,
    sample_edit,
    sample_scene,
    summarize,
)
from imgalign.shapes.world import N_CAPTION_TEMPLATES, _prompt_set, is_valid


def scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


# --------------------------------------------------------------------------- grammar


def test_caption_roundtrip_every_template() -> None:
    grouped = 0
    for scene in scenes(0, 400):
        for template in range(N_CAPTION_TEMPLATES):
            text = caption(scene, template=template)
            assert parse_caption(text) == scene, text
        grouped += caption(scene).startswith(("two ", "three "))
    assert grouped > 10  # the counting phrasing is exercised too


def test_parse_caption_is_forgiving_about_case_and_spelling() -> None:
    scene = Scene("white", (Shape("circle", "red", "small", "centre"),))
    assert parse_caption("  A small RED circle in the center on a white background. ") == scene
    two = parse_caption("two large blue squares on the left and on the right on an orange background")
    assert two == Scene(
        "orange", (Shape("square", "blue", "large", "left"), Shape("square", "blue", "large", "right"))
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a cat on a sofa", "background"),
        ("a small pink circle on the left on a white background", "colour"),
        ("a small red hexagon on the left on a white background", "shape"),
        ("a huge red circle on the left on a white background", "size"),
        ("a small red circle somewhere on a white background", "cannot read"),
        ("a small red circle on the left on a red background", "invisible"),
        ("a small red circle on the left and a small blue square on the left on a white background", "share"),
        ("a large red circle on the left and a large blue square in the centre on a white background", "overlap"),
        ("two small red circles on the left on a white background", "positions"),
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_caption(text)


def test_layout_rule() -> None:
    small = [Shape("circle", "red", "small", p) for p in ("left", "centre", "right")]
    assert is_valid("white", small)  # three small shapes fit in a row
    assert not is_valid("white", [replace(small[0], size="large"), small[1]])  # large next to centre
    assert is_valid("white", [replace(s, size="large") for s in (small[0], small[2])])  # opposite slots
    with pytest.raises(LayoutError, match="1 to 3"):
        Scene("white", tuple(small) + (Shape("square", "blue", "small", "top"),))


# --------------------------------------------------------------------------- rendering


def test_make_dataset_is_deterministic_and_pure_palette() -> None:
    images, captions, scene_list = make_dataset(64, seed=3)
    again, captions_again, _ = make_dataset(64, seed=3)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    assert [parse_caption(c) for c in captions] == scene_list
    palette = {tuple(v) for v in PALETTE.values()}
    assert {tuple(p) for p in images.reshape(-1, 3)} <= palette  # crisp: no anti-aliasing
    assert not any(s.has_heldout_pair() for s in scene_list)  # default split is "train"


def test_jitter_varies_renders_but_not_without_rng() -> None:
    scene = Scene("black", (Shape("triangle", "yellow", "large", "centre"),))
    assert np.array_equal(render(scene), render(scene))
    jittered = render_batch([scene] * 16, rng=0)
    assert len({im.tobytes() for im in jittered}) > 4


# --------------------------------------------------------------------------- oracle


def test_oracle_is_exact_on_ground_truth() -> None:
    images, captions, _ = make_dataset(600, seed=11, split="any")
    stats = summarize(judge(images, captions))
    print("ground truth", stats)
    assert stats["exact_rate"] >= 0.99
    assert stats["quality"] >= 0.999


def test_oracle_accepts_torch_float_and_larger_canvases() -> None:
    torch = pytest.importorskip("torch")
    images, captions, _ = make_dataset(60, seed=12)
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert summarize(judge(as_tensor, captions))["exact_rate"] == 1.0
    assert summarize(judge(images / 255.0, captions))["exact_rate"] == 1.0
    big, big_captions, _ = make_dataset(60, seed=12, size=64)
    assert summarize(judge(big, big_captions))["exact_rate"] == 1.0


def test_mismatched_captions_score_near_zero() -> None:
    images, captions, _ = make_dataset(600, seed=13, split="any")
    shuffled = captions[1:] + captions[:1]
    stats = summarize(judge(images, shuffled))
    print("mismatched", stats)
    assert stats["overall"] < 0.05
    assert stats["exact_rate"] < 0.02


def _judge_one(image: np.ndarray, scene: Scene) -> Judgement:
    return judge(image[None], [caption(scene)])[0]


def test_recoloured_shape_fails_colour() -> None:
    for seed, scene in enumerate(scenes(20, 60)):
        shape = scene.shapes[0]
        new = next(c for c in COLOURS if c not in (shape.colour, scene.background))
        wrong = Scene(scene.background, (replace(shape, colour=new),) + scene.shapes[1:])
        j = _judge_one(render(wrong, rng=seed), scene)
        assert j.colour < 1 and not j.exact and j.shape == 1 and j.position == 1


def test_moved_shape_fails_position() -> None:
    checked = 0
    for seed, scene in enumerate(scenes(21, 120)):
        shape, others = scene.shapes[0], scene.shapes[1:]
        for p in POSITIONS:
            moved = others + (replace(shape, position=p),)
            if p != shape.position and is_valid(scene.background, moved):
                j = _judge_one(render(Scene(scene.background, moved), rng=seed), scene)
                assert j.position < 1 and not j.exact and j.colour == 1 and j.shape == 1
                checked += 1
                break
    assert checked > 50


def test_square_drawn_as_circle_fails_shape() -> None:
    checked = 0
    for seed, scene in enumerate(scenes(22, 200)):
        if not any(s.kind == "square" for s in scene.shapes):
            continue
        as_circles = tuple(replace(s, kind="circle") if s.kind == "square" else s for s in scene.shapes)
        j = _judge_one(render(Scene(scene.background, as_circles), rng=seed), scene)
        assert j.shape < 1 and not j.exact and j.colour == 1
        checked += 1
    assert checked > 30


def test_slightly_rounded_square_is_still_a_square() -> None:
    for size in ("small", "large"):
        scene = Scene("white", (Shape("square", "red", size, "centre"),))
        image = render(scene, rng=0).copy()
        ys, xs = np.nonzero((image == PALETTE["red"]).all(-1))
        for y in (ys.min(), ys.max()):
            for x in (xs.min(), xs.max()):
                image[y, x] = PALETTE["white"]
        assert _judge_one(image, scene).exact


def test_noise_lowers_quality_and_specks_count() -> None:
    images, captions, _ = make_dataset(100, seed=14)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    clean_q = summarize(judge(images, captions))["quality"]
    noisy_q = summarize(judge(noisy, captions))["quality"]
    print("quality clean", clean_q, "noisy(sigma=20)", noisy_q)
    assert clean_q > 0.999 and noisy_q < 0.7

    scene = Scene("white", (Shape("circle", "blue", "large", "centre"),))
    specked = render(scene).copy()
    specked[1, 1] = specked[30, 2] = specked[2, 29] = PALETTE["red"]
    j = _judge_one(specked, scene)
    assert j.exact and j.count == 1  # specks are not objects...
    assert j.quality < 0.99  # ...but they are dirt


def test_extra_and_missing_objects_lower_count_and_overall() -> None:
    one = Scene("white", (Shape("circle", "red", "large", "left"),))
    two = Scene("white", one.shapes + (Shape("square", "blue", "large", "right"),))
    extra = judge_scenes(render(two)[None], [one])[0]
    missing = judge_scenes(render(one)[None], [two])[0]
    assert extra.count == 0.5 and extra.overall == 0.5 and not extra.exact
    assert missing.count == 0.5 and missing.overall == 0.5 and missing.colour == 0.5


# --------------------------------------------------------------------------- edits


def test_edits_judged_against_their_target() -> None:
    rng = np.random.default_rng(30)
    target_j, source_j, operations = [], [], set()
    for seed in range(150):
        scene = sample_scene(rng)
        instruction, target = sample_edit(scene, rng)
        operations.add(instruction.split()[0])
        assert parse_instruction(instruction, scene) == target
        assert parse_instruction(instruction, caption(scene)) == target
        source_image = render(scene, rng=seed)
        target_j.append(judge_edit(source_image, instruction, render(target, rng=seed), scene))
        source_j.append(judge_edit(source_image, instruction, source_image, caption(scene)))
    good, unedited = summarize(target_j), summarize(source_j)
    print("edit target", good, "unedited", unedited)
    assert operations >= {"make", "remove", "add"} and operations & {"move", "shift"}
    assert good["exact_rate"] >= 0.99 and good["preserved"] >= 0.99
    assert unedited["overall"] < 0.05 and unedited["edit_applied"] < 0.05


def test_edit_that_disturbs_other_objects_is_not_preserved() -> None:
    scene = Scene("white", (Shape("circle", "red", "small", "left"), Shape("square", "blue", "small", "right")))
    target = parse_instruction("make the circle green", scene)
    # the circle is recoloured correctly but the square is turned into a triangle
    vandalised = Scene("white", (target.shapes[0], replace(target.shapes[1], kind="triangle")))
    j = judge_edit(render(scene), "make the circle green", render(vandalised), scene)
    assert j.edit_applied == 1 and j.preserved == 0 and j.overall == 0


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        ("make the triangle green", "no triangle"),
        ("make the square red", "already red"),
        ("remove the circle", "ambiguous"),
        ("add a small red circle at the top", "1 to 3"),
        ("move the square to the centre", "share"),
        ("make the square larger", "overlap"),
        ("make the square sparkle", "outside the edit grammar"),
    ],
)
def test_invalid_instructions_raise(instruction: str, reason: str) -> None:
    scene = Scene(
        "white",
        (
            Shape("circle", "blue", "small", "left"),
            Shape("circle", "blue", "small", "centre"),
            Shape("square", "red", "small", "right"),
        ),
    )
    with pytest.raises(ValueError, match=reason):
        parse_instruction(instruction, scene)
    # a position disambiguates what kind and colour cannot
    remaining = parse_instruction("remove the blue circle on the left", scene).shapes
    assert [s.position for s in remaining] == ["centre", "right"]


# --------------------------------------------------------------------------- prompt sets


def test_prompt_sets_are_deterministic_and_disjoint() -> None:
    train, heldout = prompt_set("train"), prompt_set("heldout")
    _prompt_set.cache_clear()
    assert prompt_set("train") == train and prompt_set("heldout") == heldout
    assert 100 <= len(heldout) <= 1000 and len(train) >= len(heldout)
    assert not set(train) & set(heldout)
    assert len(set(heldout)) == len(heldout)
    assert all(parse_caption(p).has_heldout_pair() for p in heldout)
    assert not any(parse_caption(p).has_heldout_pair() for p in train)
    assert {pair[1] for pair in HELDOUT_PAIRS} == set(KINDS)  # every kind is held out in some colour
    with pytest.raises(ValueError):
        prompt_set("validation")


def test_shipped_shapes_t2i_loads_matches_manifest_and_samples_through_the_adapter():
    import torch

    import pipelines
    from imgalign.shapes.manifest import WEIGHTS_DIR, verify

    assert verify()["t2i"] == []
    adapter = pipelines.load(str(WEIGHTS_DIR / "t2i"), dtype=torch.float32)
    assert adapter.family == "shapes" and adapter.vae is None
    prompt = "a large red circle in the centre on a white background"
    images = adapter.sample([prompt], num_steps=6, guidance_scale=3.0, generator=[torch.Generator().manual_seed(0)])
    pipe = adapter.pipe
    expected = pipe(prompt, num_inference_steps=6, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(images, expected)
    assert images.shape == (1, 3, 32, 32)


def test_shipped_shapes_clip_matches_manifest_and_tells_colours_and_sizes_apart():
    import numpy as np
    import torch

    import rewards
    from imgalign.shapes.clip import perturb
    from imgalign.shapes.manifest import verify
    from imgalign.shapes.world import caption, render_batch, sample_scene

    assert verify()["clip"] == []
    reward = rewards.load("shapes-clip")
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng, split="heldout") for _ in range(200)]
    images = torch.from_numpy(render_batch(scenes, 32, rng)).permute(0, 3, 1, 2).float() / 255
    true = reward.score_batched(images, [caption(s, rng) for s in scenes])
    # What the shipped ShapesCLIP does today on held-out scenes (see the manifest): colour 0.93,
    # size 0.95; kind (0.51) and position (0.57) are not yet reliable, so they are not pinned.
    for field in ("colour", "size"):
        false = reward.score_batched(images, [caption(perturb(s, rng, field), rng) for s in scenes])
        assert (true > false).float().mean() > 0.85, field


def test_shapes_clip_text_feature_reads_the_whole_caption():
    import torch

    from imgalign.shapes.clip import shapes_clip

    reward = shapes_clip()
    a = reward.encoder.encode_text(["a small red circle on the left on a white background"])
    b = reward.encoder.encode_text(["a small red square on the left on a white background"])
    c = reward.encoder.encode_text(["a small red circle on the left on a black background"])
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, c, atol=1e-3)
