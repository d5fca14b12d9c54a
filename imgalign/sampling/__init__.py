"""Samplers built from adapter steps, all with one call shape: ``run_sampler(name, adapter, prompts, ...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .best_of_n import best_candidates, best_of_n_candidates, best_of_n_sample
from .combined import aig_base_weights, aig_sample, combined_sample
from .segments import (
    SegmentPlan,
    SegmentRouting,
    load_routing,
    load_segment_loras,
    plan_segments,
    sample_segments,
    save_routing,
)

SAMPLERS = ("ode", "combined", "aig", "best-of-n", "segments")


def run_sampler(
    name: str, adapter: Any, prompts: str | Sequence[str], *, switch_step: int | None = None, aig_power: float = 1.0,
    reward: Any = None, n: int = 4, routing: SegmentRouting | None = None, skip: dict[int, int] | None = None,
    **common: Any,
) -> Any:  # fmt: skip
    """Images [B,3,H,W] in [0,1] from the sampler ``name``.

    ``ode``: the pipeline's own deterministic loop; ``combined``: base model for the first
    ``switch_step`` steps, then the LoRA (ImageReFL); ``aig``: base/tuned interpolation;
    ``best-of-n``: the best of ``n`` samples under ``reward``; ``segments``: each segment of
    ``routing`` runs its own LoRA (timestep-segment DPO), segment ``k`` with ``skip[k]`` steps if given.
    ``common`` holds ``num_steps``, ``guidance_scale``, ``height``, ``width``, ``generator`` and
    conditioning keywords.
    """
    if name == "ode":
        return adapter.sample(prompts, **common)
    if name == "combined":
        if switch_step is None:
            switch_step = (3 * common.get("num_steps", 40)) // 4
        return combined_sample(adapter, prompts, switch_step=switch_step, **common)
    if name == "aig":
        return aig_sample(adapter, prompts, power=aig_power, **common)
    if name == "best-of-n":
        if reward is None:
            raise ValueError("the best-of-n sampler needs a reward")
        return best_of_n_sample(adapter, prompts, reward=reward, n=n, **common)
    if name == "segments":
        if routing is None:
            raise ValueError("the segments sampler needs a routing (which LoRA runs in which noise range)")
        return sample_segments(adapter, prompts, routing, skip=skip, **common)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


__all__ = [
    "SAMPLERS",
    "SegmentPlan",
    "SegmentRouting",
    "aig_base_weights",
    "aig_sample",
    "best_candidates",
    "best_of_n_candidates",
    "best_of_n_sample",
    "combined_sample",
    "load_routing",
    "load_segment_loras",
    "plan_segments",
    "run_sampler",
    "sample_segments",
    "save_routing",
]
