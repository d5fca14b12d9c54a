"""Samplers built from adapter steps, all with one call shape: ``run_sampler(name, adapter, prompts, ...)``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from .search import (
    NoiseSearch,
    SamplerOutput,
    check_search_options,
    noise_search_sample,
    path_search_sample,
    search_noise,
    speculative_sample,
)

SAMPLERS = ("ode", "combined", "aig", "best-of-n", "segments", "noise-search", "path-search", "speculative")
#: Samplers that pick by a reward (``reward=`` is required); ``n`` is their number of candidates.
REWARD_SAMPLERS = ("best-of-n", "noise-search", "path-search", "speculative")
_SEARCH = {"noise-search": noise_search_sample, "path-search": path_search_sample, "speculative": speculative_sample}


def run_sampler(
    name: str, adapter: Any, prompts: str | Sequence[str], *, switch_step: int | None = None, aig_power: float = 1.0,
    reward: Any = None, n: int = 4, routing: SegmentRouting | None = None, skip: dict[int, int] | None = None,
    search: Mapping[str, Any] | None = None, return_output: bool = False, **common: Any,
) -> Any:  # fmt: skip
    """Images [B,3,H,W] in [0,1] from the sampler ``name`` (a :class:`SamplerOutput` with ``return_output``).

    ``ode``: the pipeline's own deterministic loop; ``combined``: base model for the first
    ``switch_step`` steps, then the LoRA (ImageReFL); ``aig``: base/tuned interpolation;
    ``best-of-n``: the best of ``n`` samples under ``reward``; ``segments``: each segment of
    ``routing`` runs its own LoRA (timestep-segment DPO), segment ``k`` with ``skip[k]`` steps if given;
    ``noise-search``, ``path-search``, ``speculative``: test-time search under ``reward``
    (:mod:`imgalign.sampling.search`) with ``n`` candidates (paths for ``path-search``) and the
    sampler's own options in ``search`` (e.g. ``{"method": "zero-order", "rounds": 2}``).
    ``common`` holds ``num_steps``, ``guidance_scale``, ``height``, ``width``, ``generator`` and
    conditioning keywords. ``return_output`` also gives the reward of each returned image (reward
    samplers) and the function evaluations spent on it (``nfe``).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name in REWARD_SAMPLERS and reward is None:
        raise ValueError(f"the {name} sampler needs a reward")
    if search and name not in _SEARCH:
        raise ValueError(f"search options are for the {', '.join(_SEARCH)} samplers, not {name!r}")
    if name in _SEARCH:
        return _SEARCH[name](adapter, prompts, reward=reward, n=n, return_output=return_output, **dict(search or {}),
                             **common)  # fmt: skip
    scores = None
    if name == "ode":
        images, nfe = adapter.sample(prompts, **common), common.get("num_steps", 30)
    elif name == "combined":
        if switch_step is None:
            switch_step = (3 * common.get("num_steps", 40)) // 4
        images, nfe = combined_sample(adapter, prompts, switch_step=switch_step, **common), common.get("num_steps", 40)
    elif name == "aig":
        images = aig_sample(adapter, prompts, power=aig_power, **common)
        nfe = sum(int(s > 0) + int(s < 1) for s in aig_base_weights(common.get("num_steps", 40), aig_power))
    elif name == "best-of-n":
        images, all_scores = best_of_n_sample(adapter, prompts, reward=reward, n=n, return_scores=True, **common)
        scores, nfe = all_scores.max(dim=1).values, n * common.get("num_steps", 30)
    else:  # segments
        if routing is None:
            raise ValueError("the segments sampler needs a routing (which LoRA runs in which noise range)")
        images = sample_segments(adapter, prompts, routing, skip=skip, **common)
        if return_output:
            nfe = plan_segments(adapter, routing, common.get("num_steps", 30), skip=skip, height=common.get("height"),
                                width=common.get("width")).function_evaluations  # fmt: skip
    if not return_output:
        return images
    return SamplerOutput(images, scores, [nfe] * len(images))


__all__ = [
    "REWARD_SAMPLERS",
    "SAMPLERS",
    "NoiseSearch",
    "SamplerOutput",
    "SegmentPlan",
    "SegmentRouting",
    "aig_base_weights",
    "aig_sample",
    "best_candidates",
    "best_of_n_candidates",
    "best_of_n_sample",
    "check_search_options",
    "combined_sample",
    "load_routing",
    "load_segment_loras",
    "noise_search_sample",
    "path_search_sample",
    "plan_segments",
    "run_sampler",
    "sample_segments",
    "save_routing",
    "search_noise",
    "speculative_sample",
]
