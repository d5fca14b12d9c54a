"""Best-of-N sampling: draw N candidates per image and keep the one a reward scores highest.

The test-time baseline every fine-tuning method is measured against (rejection sampling;
Nakano et al. 2021 for text, and the "best-of-N" column of most image-alignment papers):
no weights change, the cost is N times the sampling, and the gain is bounded by what the
base model already draws. Candidate ``c`` of output image ``i`` starts from a seed drawn
from image ``i``'s own generator, so a fixed set of generators gives a fixed result and
output ``i`` does not depend on the other images of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def best_of_n_candidates(
    adapter: Any,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    n: int = 4,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    **common: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All candidates ``[B, n, 3, H, W]`` and their scores ``[B, n]`` under ``reward``.

    The first ``m`` candidates of image ``i`` are the ones best-of-``m`` would draw, so one call
    gives the whole best-of-N curve (reward and truth against N; Gao et al. 2023 measure
    reward over-optimisation this way).
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = len(prompts)
    seeds = candidate_seeds(generator, batch, n)
    candidates = []
    for c in range(n):
        candidate_generators = [torch.Generator("cpu").manual_seed(seeds[i][c]) for i in range(batch)]
        candidates.append(adapter.sample(prompts, generator=candidate_generators, **common))
    stacked = torch.stack(candidates, dim=1)  # [B, n, 3, H, W]
    with torch.no_grad():
        flat = stacked.flatten(0, 1)
        scores = reward.score_batched(flat, [p for p in prompts for _ in range(n)]).float().view(batch, n)
    return stacked, scores


def per_prompt_generators(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch: int
) -> list[torch.Generator | None]:
    """One generator (or None: the global RNG) per prompt; a single generator serves them all."""
    if generator is None:
        return [None] * batch
    if isinstance(generator, torch.Generator):
        return [generator] * batch
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for {batch} prompts")
    return generators


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed for a fresh generator, drawn from ``generator`` (None: the global RNG)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def candidate_seeds(
    generator: torch.Generator | Sequence[torch.Generator] | None, batch: int, n: int
) -> list[list[int]]:
    """``seeds[i][c]``: the seed of candidate ``c`` of image ``i``, drawn from image ``i``'s generator.

    Best-of-N and the samplers that must match it (speculative rejection without pruning)
    start candidate ``c`` of image ``i`` from ``torch.Generator("cpu").manual_seed(seeds[i][c])``.
    """
    return [[draw_seed(g) for _ in range(n)] for g in per_prompt_generators(generator, batch)]


def best_of_n_sample(
    adapter: Any,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    n: int = 4,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_scores: bool = False,
    **common: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Images [B,3,H,W]: for each prompt the best of ``n`` samples under ``reward``.

    ``common`` goes to ``adapter.sample`` (``num_steps``, ``guidance_scale``, ``height``, ...).
    With ``return_scores`` also returns the candidates' scores ``[B, n]``.
    """
    stacked, scores = best_of_n_candidates(adapter, prompts, reward=reward, n=n, generator=generator, **common)
    images = best_candidates(stacked, scores)
    return (images, scores) if return_scores else images


def best_candidates(candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring candidate per image: ``[B, n, ...]``, ``[B, n]`` -> ``[B, ...]``."""
    return candidates[torch.arange(len(candidates)), scores.argmax(dim=1).to(candidates.device)]
