"""The learned per-object verifier: its questions, its reward, its training, and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rewards
from imgalign.prompt_sets import prompt_set
from imgalign.shapes import parse_caption, render_batch
from imgalign.shapes.clip import perturb
from imgalign.shapes.verifier import (
    QUERY_FIELDS,
    ObjectVerifier,
    ShapesVerifierReward,
    _matches,
    encode_queries,
    load_verifier,
    make_queries,
    scene_queries,
    train_verifier,
    within_prompt_agreement,
)
from imgalign.shapes.world import caption

PROMPT = "a small orange circle on the left and a large red square on the right on a white background"


def test_queries_encode_each_field_with_an_any_slot_and_reject_unknown_values():
    encoded = encode_queries([("red", "circle", None, "left"), (None, None, "large", None)])
    sizes = [len(v) for v in QUERY_FIELDS.values()]
    red = list(QUERY_FIELDS["colour"]).index("red")
    assert encoded.tolist()[0][0] == red and encoded.tolist()[0][2] == sizes[2]  # size: "any"
    assert encoded.tolist()[1][:2] == sizes[:2]
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        encode_queries([("mauve", "circle", None, None)])


def test_training_questions_are_answered_by_what_the_image_contains():
    present = [("orange", "circle", "small", "left"), ("red", "square", "large", "right")]
    rng = np.random.default_rng(0)
    queries, labels = make_queries(present, rng, 400)
    assert all(bool(label) == _matches(q, present) for q, label in zip(queries, labels))
    assert 0.3 < np.mean(labels) < 0.7
    # most negatives change one field of a present object: the binding a wrong sample gets wrong
    near = [q for q, label in zip(queries, labels) if not label and sum(
        a is not None and a != b for a, b in zip(q, present[0])) == 1]  # fmt: skip
    assert len(near) > 20
    # an empty image has only negatives; an unclassified blob is asked about without its kind
    assert not any(make_queries([], rng, 20)[1])
    blob_queries, blob_labels = make_queries([("blue", "unknown", "small", "top")], rng, 50)
    assert all(q[1] != "unknown" for q in blob_queries) and any(blob_labels)


def test_reward_averages_over_the_captions_objects_and_is_differentiable():
    torch.manual_seed(0)
    reward = ShapesVerifierReward(ObjectVerifier())
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    two = PROMPT
    one = "a small blue triangle at the top on a black background"
    scores = reward(images, [two, one])
    assert scores.shape == (2,) and (scores <= 0).all()
    alone = reward(images[1:], [one])  # padding the shorter caption does not change its score
    torch.testing.assert_close(scores[1:], alone)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert scene_queries(parse_caption(two), ("colour", "kind")) == [("orange", "circle", None, None), ("red", "square", None, None)]
    assert ShapesVerifierReward(ObjectVerifier(), ("colour", "kind")).info.name == "shapes-verifier-colour-kind"
    with pytest.raises(ValueError, match="fields must be among"):
        ShapesVerifierReward(ObjectVerifier(), ("shade",))


def test_training_writes_a_loadable_fp16_checkpoint(tmp_path):
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    objects = [[("red", "circle", "small", "left")], None, [("blue", "unknown", "large", "top")]]
    out = train_verifier(tmp_path / "verifier", images, objects, steps=2, batch_size=8, seed=0)
    assert json.loads((out / "config.json").read_text()) == ObjectVerifier().config
    model = load_verifier(out)
    x = torch.rand(2, 3, 32, 32)
    assert ShapesVerifierReward(model)(x, [PROMPT, PROMPT]).isfinite().all()
    with pytest.raises(ValueError, match="no image the oracle could read"):
        train_verifier(tmp_path / "none", images[:1], [None], steps=1)
    with pytest.raises(FileNotFoundError, match="shapes build --only verifier"):
        load_verifier(tmp_path / "missing")


def test_within_prompt_agreement_counts_only_pairs_the_truth_separates():
    truth = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert within_prompt_agreement(np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), truth) == 1.0
    assert within_prompt_agreement(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), truth) == 0.0


# ----------------------------------------------------------------------------- the shipped verifier
def test_shipped_verifier_knows_colour_binding_on_rendered_heldout_scenes():
    reward = rewards.load("shapes-verifier")
    rng = np.random.default_rng(7)
    scenes = [parse_caption(p) for p in prompt_set("shapes-heldout")[:64]]
    images = torch.from_numpy(render_batch(scenes, 32, rng)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        true = reward(images, [caption(s, rng) for s in scenes])
        recoloured = reward(images, [caption(perturb(s, rng, "colour"), rng) for s in scenes])
    assert (true > recoloured).float().mean() > 0.95


@pytest.mark.slow
def test_best_of_four_under_the_shipped_verifier_raises_oracle_colour_on_heldout_prompts():
    """The CI-sized alignment check: same prompts and seeds, plain sampling vs the verifier's pick."""
    from imgalign.sampling import best_of_n_candidates
    from imgalign.shapes import judge
    from imgalign.shapes.demo import best_of_n_curve, load_shipped_pipeline

    adapter = load_shipped_pipeline("t2i")
    prompts = prompt_set("shapes-heldout-eval")[:24]
    generators = [torch.Generator().manual_seed(500 + i) for i in range(len(prompts))]
    with torch.no_grad():
        candidates, scores = best_of_n_candidates(adapter, prompts, reward=rewards.load("shapes-verifier"), n=4,
                                                  generator=generators, num_steps=10, guidance_scale=3.0)  # fmt: skip
    curve = best_of_n_curve(candidates, scores, prompts)
    first = np.mean([j.colour for j in judge(candidates[:, 0], prompts)])
    assert curve["n"] == [1.0, 2.0, 4.0]
    assert curve["oracle/colour"][0] == pytest.approx(first)  # N = 1 is plain sampling
    assert curve["reward"][0] <= curve["reward"][1] <= curve["reward"][2]  # the pick's reward cannot fall
    assert curve["oracle/colour"][2] - curve["oracle/colour"][0] >= 0.08
