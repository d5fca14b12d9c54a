"""Shapes: a procedural world of coloured shapes with an exact programmatic judge.

Used to train small text-to-image models and reward models, and to measure honestly
whether alignment improved the truth (the oracle) or only a learned reward.

Three tiers, each importing only from the tiers above it (``tests/test_shapes_plugin.py``
checks the imports, so the world stays usable without torch and a model never depends on
the demo):

* the world -- ``world`` (scenes, renderer, captions, edit instructions) and ``oracle`` (the
  exact judge); numpy and scipy only. This package re-exports it.
* the models -- ``t2i`` (the text-to-image model and the pipeline loader), ``edit``, ``clip``
  (ShapesCLIP), ``verifier``, ``preference``, ``edit_reward``, ``rewards`` (the oracle as a
  reward) and ``manifest`` (the shipped weights).
* the applications -- ``build`` (regenerates the shipped weights), ``demo`` (the CPU demo
  and its reports) and ``algorithms`` (the demo's methods table, readable without torch).

Nothing here registers itself on import: the rewards (``shapes-oracle``, ``shapes-verifier``,
...) and pipelines (``shapes``, ``shapes-edit``) reach ``rewards.load`` and ``pipelines.load``
through the ``imgalign.rewards`` and ``imgalign.pipelines`` entry points in ``pyproject.toml``.
"""

from .oracle import (
    ATTRIBUTES,
    FoundShape,
    ImageAnalysis,
    Judgement,
    analyse,
    judge,
    judge_edit,
    judge_scenes,
    match_shapes,
    summarize,
    to_uint8_images,
)
from .world import (
    COLOURS,
    GEOMETRY,
    HELDOUT_PAIRS,
    KINDS,
    PALETTE,
    POSITIONS,
    SIZES,
    Geometry,
    LayoutError,
    Scene,
    Shape,
    caption,
    is_valid,
    make_dataset,
    parse_caption,
    parse_instruction,
    prompt_set,
    render,
    render_batch,
    sample_edit,
    sample_scene,
)

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "GEOMETRY",
    "HELDOUT_PAIRS",
    "KINDS",
    "PALETTE",
    "POSITIONS",
    "SIZES",
    "FoundShape",
    "Geometry",
    "ImageAnalysis",
    "Judgement",
    "LayoutError",
    "is_valid",
    "Scene",
    "Shape",
    "analyse",
    "caption",
    "judge",
    "judge_edit",
    "judge_scenes",
    "make_dataset",
    "match_shapes",
    "parse_caption",
    "parse_instruction",
    "prompt_set",
    "render",
    "render_batch",
    "sample_edit",
    "sample_scene",
    "summarize",
    "to_uint8_images",
]
