"""Noise search: Smart-GRPO's per-prompt Gaussian over the initial noise, and zero-order search around a pivot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pipelines import DiffusionAdapter

from ..best_of_n import per_prompt_generators
from .common import Generators, SamplerOutput, SearchRun, check_common, history_lists, positive_int, randn

OPTIONS = ("method", "rounds", "keep", "smoothing", "std_floor", "radius", "batch_size")


def check_options(*, n: int, num_steps: int, **options: Any) -> None:
    """A one-line ValueError naming the option for a bad noise-search setting (no model needed)."""
    check_common("noise-search", OPTIONS, n=n, num_steps=num_steps, options=options)
    get = options.get
    method = get("method", "smart")
    if method not in ("smart", "zero-order"):
        raise ValueError(f"noise-search method must be 'smart' or 'zero-order', got {method!r}")
    positive_int("noise-search rounds", get("rounds", 1))
    if method == "smart":
        keep = get("keep")
        keep = max(1, n // 4) if keep is None else positive_int("noise-search keep", keep)
        if keep > n:
            raise ValueError(f"noise-search keep must be <= the candidates per round (n = {n}), got {keep}")
        smoothing = get("smoothing", 0.5)
        if not (isinstance(smoothing, int | float) and 0 <= smoothing < 1):
            raise ValueError(f"noise-search smoothing must be in [0, 1), got {smoothing!r}")
        floor = get("std_floor", 0.5)
        if not (isinstance(floor, int | float) and math.isfinite(floor) and floor >= 0):
            raise ValueError(f"noise-search std_floor must be a finite number >= 0, got {floor!r}")
    else:
        radius = get("radius", 0.5)
        if not (isinstance(radius, int | float) and 0 < radius <= 1):
            raise ValueError(f"noise-search radius must be in (0, 1], got {radius!r}")


@dataclass
class NoiseSearch:
    """The outcome of :func:`search_noise` for B prompts.

    ``mean`` / ``std`` [B,C,h,w]: the refined Gaussian over initial latents (the space of
    ``adapter.prepare_latents``); ``best_noise`` [B,C,h,w] and ``best_score`` [B]: the candidate
    with the highest one-step reward over all rounds; ``round_best`` / ``round_mean`` [rounds, B]:
    the best and mean one-step reward of each round's candidates; ``nfe``: function evaluations
    spent per prompt (``rounds * candidates``, one step each).
    """

    mean: torch.Tensor
    std: torch.Tensor
    best_noise: torch.Tensor
    best_score: torch.Tensor
    round_best: torch.Tensor
    round_mean: torch.Tensor
    nfe: int

    def draw(self, per_prompt: int = 1, generator: Generators = None) -> torch.Tensor:
        """``per_prompt`` initial latents per prompt from N(mean, std²): [B * per_prompt, C, h, w], prompt-major.

        What a GRPO group's rollouts start from; ``generator`` is one per prompt (or one for all).
        """
        generators = per_prompt_generators(generator, len(self.mean))
        eps = torch.stack([randn((per_prompt, *self.mean.shape[1:]), g, self.mean.device) for g in generators])
        return (self.mean[:, None] + self.std[:, None] * eps).flatten(0, 1)


# ============================================================================ Smart-GRPO noise search
def search_noise(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    num_steps: int,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    rounds: int = 3,
    candidates: int = 8,
    keep: int | None = None,
    smoothing: float = 0.5,
    std_floor: float = 0.5,
    init_mean: torch.Tensor | None = None,
    init_std: torch.Tensor | float | None = None,
    generator: Generators = None,
    batch_size: int | None = None,
    **cond_kwargs: Any,
) -> NoiseSearch:
    """Smart-GRPO's noise search: a Gaussian over each prompt's initial noise, moved towards high reward.

    Per prompt, a diagonal Gaussian N(mu, diag(sigma²)) over the initial latents starts at the
    sampler's own N(0, I) (``init_mean`` / ``init_std`` start elsewhere). Each of ``rounds``
    rounds draws ``candidates`` latents per prompt from it, scores each by the reward of its
    *one-step decode* (the x0 estimate of the first step's prediction,
    ``pred_x0(predict(z, sched, 0), sched, 0, z)``; x0 = z - sigma_0 v for flow models), keeps the
    ``keep`` best and refits::

        mu    <- s * mu    + (1 - s) * mean(kept)
        sigma <- max(s * sigma + (1 - s) * std(kept), floor)

    with ``s = smoothing`` and ``floor = std_floor`` (times the scheduler's initial noise scale,
    1 for flow and VP models). All prompts' candidates go through one ``predict`` call
    (chunks of ``batch_size`` rows if given). ``num_steps``, ``guidance_scale``, ``height``,
    ``width`` and ``cond_kwargs`` are the sampling settings the noise is for: the first step's
    noise level and guidance depend on them. ``generator``: one per prompt (candidates of
    prompt ``i`` come from generator ``i``), one for all, or None (the global RNG).

    The paper states the idea (decode candidates in one step, score, refine the noise
    distribution) but not these choices; ours, and why:

    * ``candidates=8``, ``rounds=3``, ``keep`` = the top quarter (2 of 8; a cross-entropy-method
      elite fraction): 24 one-step evaluations per prompt, about one 25-step sample.
    * ``std(kept)`` is the per-element sample standard deviation (Bessel-corrected; 0 when
      ``keep=1``), so a small elite shrinks sigma quickly; ``smoothing=0.5`` halves each move and
      the floor (``0.5``) keeps the rollouts drawn from the result diverse: GRPO's advantages
      vanish when a group's samples coincide.
    * mu and sigma are refitted per latent element (diagonal), per prompt.
    * the best candidate is kept across rounds (``best_noise``), not only the last round's.

    The one-step decode at the first step sees pure noise, so how well it predicts the final
    sample's reward depends on the model (bench/search_samplers.py measures it on Shapes).
    """
    positive_int("rounds", rounds)
    positive_int("candidates", candidates)
    keep = max(1, candidates // 4) if keep is None else positive_int("keep", keep)
    if keep > candidates:
        raise ValueError(f"keep must be <= candidates ({candidates}), got {keep}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not (math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"std_floor must be a finite number >= 0, got {std_floor}")
    run = SearchRun(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
    b, k, shape, dev = run.batch, candidates, run.latent_shape, run.device

    def start_at(value: torch.Tensor | float | None, default: float) -> torch.Tensor:
        value = default if value is None else value
        return torch.as_tensor(value, dtype=torch.float32).to(dev).expand((b, *shape)).clone()

    floor = std_floor * run.scale
    mean, std = start_at(init_mean, 0.0), start_at(init_std, run.scale).clamp_min(floor)
    rows = [i for i in range(b) for _ in range(k)]
    every = torch.arange(b, device=dev)
    best_noise, best_score = mean.clone(), torch.full((b,), -math.inf)
    round_best, round_mean = [], []
    for _ in range(rounds):
        eps = torch.stack([run.noise(i, k) for i in range(b)])  # [B, K, ...]
        z = mean[:, None] + std[:, None] * eps
        scores = run.score(run.decode(run.one_step_x0(z.flatten(0, 1), rows)), rows).view(b, k)
        top_scores, top = scores.topk(keep, dim=1)
        top = top.to(dev)
        better = top_scores[:, 0] > best_score
        best_score = torch.where(better, top_scores[:, 0], best_score)
        best_noise = torch.where(better.to(dev).view(b, *[1] * len(shape)), z[every, top[:, 0]], best_noise)
        kept = z[every[:, None], top]  # [B, keep, ...]
        kept_std = kept.std(dim=1) if keep > 1 else torch.zeros_like(mean)
        mean = smoothing * mean + (1 - smoothing) * kept.mean(dim=1)
        std = (smoothing * std + (1 - smoothing) * kept_std).clamp_min(floor)
        round_best.append(scores.max(dim=1).values)
        round_mean.append(scores.mean(dim=1))
    return NoiseSearch(mean, std, best_noise, best_score, torch.stack(round_best), torch.stack(round_mean), rounds * k)


# ============================================================================ the noise-search sampler
NoiseSearchMethod = Literal["smart", "zero-order"]


def noise_search_sample(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    method: NoiseSearchMethod = "smart",
    n: int = 8,
    rounds: int = 3,
    keep: int | None = None,
    smoothing: float = 0.5,
    std_floor: float = 0.5,
    radius: float = 0.5,
    num_steps: int = 30,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Generators = None,
    batch_size: int | None = None,
    return_output: bool = False,
    **cond_kwargs: Any,
) -> torch.Tensor | SamplerOutput:
    """Search the initial noise, then sample from the noise found.

    ``method="smart"`` (Smart-GRPO): :func:`search_noise` with ``n`` candidates per round
    (``rounds``, ``keep``, ``smoothing``, ``std_floor``), then one full deterministic sample from
    the *best candidate* it scored. Not the mean: the mean of several Gaussian draws is an
    atypical noise (its norm is far below that of a draw, a region the denoiser never saw in
    training), while the best candidate is a draw from a Gaussian near N(0, I). Costs
    ``rounds * n + num_steps`` evaluations per image.

    ``method="zero-order"`` (Ma et al. 2025, §3.2): a pivot noise is sampled in full and scored;
    each of ``rounds`` rounds samples ``n`` candidates in the pivot's neighbourhood in full, and
    the pivot moves to the best of them if it scores higher than the pivot. The neighbourhood
    is ``sqrt(1 - radius²) * pivot + radius * eps`` (our choice: the paper takes candidates at a
    distance ``lambda`` from the pivot; this mixing keeps every candidate distributed as the
    sampler's own N(0, I) noise, and ``radius=1`` is plain random search). The returned score
    never falls below the first pivot's. Costs ``(1 + rounds * n) * num_steps`` per image.

    Returns images [B,3,H,W] in [0,1], or with ``return_output`` a :class:`SamplerOutput` whose
    scores are the returned images' rewards.
    """
    check_options(n=n, num_steps=num_steps, method=method, rounds=rounds, keep=keep, smoothing=smoothing,
                  std_floor=std_floor, radius=radius)  # fmt: skip
    if method == "smart":
        found = search_noise(
            adapter, prompts, reward=reward, num_steps=num_steps, guidance_scale=guidance_scale, height=height,
            width=width, rounds=rounds, candidates=n, keep=keep, smoothing=smoothing, std_floor=std_floor,
            generator=generator, batch_size=batch_size, **cond_kwargs,
        )  # fmt: skip
        run = SearchRun(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
        rows = list(range(run.batch))
        run.reward_images = [found.nfe] * run.batch  # one-step decodes scored during the search
        x, _ = run.denoise(found.best_noise, rows, 0, run.steps, run.step_generators(rows))
        images = run.decode(x)
        scores = run.score(images, rows)
        history = {"round_best": found.round_best, "round_mean": found.round_mean, "one_step_best": [found.best_score]}
        nfe = [found.nfe + run.steps] * run.batch
    else:
        run = SearchRun(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
        images, scores, nfe, history = _zero_order(run, n=n, rounds=rounds, radius=radius)
    output = SamplerOutput(images, scores, nfe, {**history_lists(history), "reward_images": run.reward_images})
    return output if return_output else images


def _zero_order(run: SearchRun, *, n: int, rounds: int, radius: float):
    b, t = run.batch, run.steps
    rows = list(range(b))
    pivot = torch.cat([run.noise(i, 1) for i in rows]) * run.scale
    x, _ = run.denoise(pivot, rows, 0, t, run.step_generators(rows))
    images = run.decode(x)
    scores = run.score(images, rows)
    history = {"round_best": [scores.clone()], "round_mean": [scores.clone()]}
    cand_rows = [i for i in rows for _ in range(n)]
    stay = math.sqrt(1 - radius**2)
    for _ in range(rounds):
        eps = torch.stack([run.noise(i, n) for i in rows]) * run.scale  # [B, n, ...]
        candidates = stay * pivot[:, None] + radius * eps
        x, _ = run.denoise(candidates.flatten(0, 1), cand_rows, 0, t, run.step_generators(cand_rows))
        cand_images = run.decode(x).view(b, n, *images.shape[1:])
        cand_scores = run.score(cand_images.flatten(0, 1), cand_rows).view(b, n)
        best, j = cand_scores.max(dim=1)
        for i in rows:
            if best[i] > scores[i]:
                pivot[i], images[i], scores[i] = candidates[i, j[i]], cand_images[i, j[i]], best[i]
        history["round_best"].append(scores.clone())
        history["round_mean"].append(cand_scores.mean(dim=1))
    return images, scores, [t * (1 + rounds * n)] * b, history
