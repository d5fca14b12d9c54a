"""Named prompt sets, usable wherever a prompt file is (``data.prompts``, ``--prompt-set``).

The Shapes held-out prompts (each with a colour/shape pair the generator never saw) are also
split in two disjoint halves, so that alignment can train on prompts of that kind and still
be judged on prompts it never trained on: ``shapes-heldout-eval`` (the first 100) and
``shapes-heldout-align`` (the other 200).
"""

from __future__ import annotations

HELDOUT_EVAL_SIZE = 100

PROMPT_SETS = {
    "shapes-train": ("train", slice(None)),  # captions of the Shapes training split
    "shapes-heldout": ("heldout", slice(None)),  # held-out colour/shape pairs, never seen in training
    "shapes-heldout-eval": ("heldout", slice(0, HELDOUT_EVAL_SIZE)),
    "shapes-heldout-align": ("heldout", slice(HELDOUT_EVAL_SIZE, None)),
}


def prompt_set(name: str) -> list[str]:
    """The prompts of a named set; ``KeyError`` names the known sets."""
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    from imgalign.shapes import prompt_set as shapes_prompt_set

    split, part = PROMPT_SETS[name]
    return shapes_prompt_set(split)[part]
