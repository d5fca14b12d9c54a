"""Named prompt sets, usable wherever a prompt file is (``data.prompts``, ``--prompt-set``)."""

from __future__ import annotations

PROMPT_SETS = {
    "shapes-train": "train",  # captions of the Shapes training split
    "shapes-heldout": "heldout",  # held-out colour/shape pairs, never seen in training
}


def prompt_set(name: str) -> list[str]:
    """The prompts of a named set; ``KeyError`` names the known sets."""
    if name not in PROMPT_SETS:
        raise KeyError(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    from imgalign.shapes import prompt_set as shapes_prompt_set

    return shapes_prompt_set(PROMPT_SETS[name])
