"""Search over paths (Ma et al. 2025): denoise part way, re-noise into branches, keep the best, repeat."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipelines import DiffusionAdapter, Schedule

from .common import (Generators, SamplerOutput, SearchRun, check_common, history_lists, keeps_history, positive_int,
                     single_step_error)  # fmt: skip


def _renoise(adapter: DiffusionAdapter, sched: Schedule, x: torch.Tensor, i: int, j: int, eps: torch.Tensor) -> torch.Tensor:
    """A draw from the forward process q(x_j | x_i): latents at step ``i`` noised back to the level of step ``j < i``.

    Flow (x_t = (1-t) x0 + t eps): x_j = a x_i + sqrt(t_j² - a² t_i²) eps with a = (1-t_j)/(1-t_i).
    Sigma-scaled (x = x0 + sigma eps): x_j = x_i + sqrt(sigma_j² - sigma_i²) eps.
    Variance-preserving (x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps): x_j = sqrt(ab_j/ab_i) x_i + sqrt(1 - ab_j/ab_i) eps.
    """
    if adapter.is_flow:
        ti, tj = float(sched.sigmas[i]), float(sched.sigmas[j])
        a = (1 - tj) / (1 - ti)
        b = math.sqrt(max(tj**2 - (a * ti) ** 2, 0.0))
    elif sched.sigmas is not None:
        si, sj = float(sched.sigmas[i]), float(sched.sigmas[j])
        a, b = 1.0, math.sqrt(max(sj**2 - si**2, 0.0))
    else:
        alphas = adapter.scheduler.alphas_cumprod
        ratio = float(alphas[int(sched.timesteps[j])]) / float(alphas[int(sched.timesteps[i])])
        a, b = math.sqrt(ratio), math.sqrt(max(1 - ratio, 0.0))
    return (a * x.float() + b * eps).to(x.dtype)


def path_plan(num_steps: int, start: int | None = None, backtrack: int | None = None, advance: int | None = None):
    """The search-over-paths rounds for ``num_steps`` steps: ``(start, [(i, j, k), ...])``.

    Round ``(i, j, k)``: paths at step ``i`` are re-noised back to step ``j = max(i - backtrack, 0)``
    and denoised to step ``k = min(j + advance, num_steps)``. Defaults: ``start = max(1, T // 4)``,
    ``backtrack = max(1, T // 10)``, ``advance = backtrack + ceil((T - start) / 3)`` (three rounds).
    """
    t = num_steps
    if t < 2:
        raise ValueError(f"path-search needs num_steps >= 2, got {t}")
    start = max(1, t // 4) if start is None else start
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < t:
        raise ValueError(f"path-search start must be a step in [1, num_steps - 1 = {t - 1}], got {start!r}")
    backtrack = max(1, t // 10) if backtrack is None else positive_int("path-search backtrack", backtrack)
    if advance is None:
        advance = backtrack + math.ceil((t - start) / 3)
    if isinstance(advance, bool) or not isinstance(advance, int) or advance <= backtrack:
        raise ValueError(f"path-search advance must be an integer > backtrack ({backtrack}), got {advance!r}")
    rounds, i = [], start
    while i < t:
        j = max(i - backtrack, 0)
        k = min(j + advance, t)
        rounds.append((i, j, k))
        i = k
    return start, rounds


def path_search_sample(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    n: int = 4,
    branches: int = 2,
    start: int | None = None,
    backtrack: int | None = None,
    advance: int | None = None,
    num_steps: int = 30,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Generators = None,
    batch_size: int | None = None,
    return_output: bool = False,
    **cond_kwargs: Any,
) -> torch.Tensor | SamplerOutput:
    """Search over paths (Ma et al. 2025, arXiv:2501.09732, §3.2), on the schedule's steps.

    The procedure, per prompt, with ``T = num_steps`` and the rounds of :func:`path_plan`:

    1. ``n`` initial noises are denoised (deterministic steps) from step 0 to step ``start``.
    2. A round ``(i, j, k)``: each of the ``n`` paths at step ``i`` is re-noised ``branches``
       times with the forward process q(x_j | x_i) back to the noisier step ``j = i - backtrack``
       (:func:`_renoise`: the exact Gaussian transition, no model call), and every branch is
       denoised from step ``j`` to ``k = j + advance``.
    3. If ``k < T``, each branch is scored by the reward of the x0 estimate of its last
       prediction (at step ``k - 1``; the paper spends one more denoising step on this, we reuse
       the one already made), and the ``n`` best of the ``n * branches`` branches go on from step
       ``k``. If ``k = T``, the branches are finished images: all are scored and the best is
       returned (the paper's final random search among the survivors).

    Costs ``n * start + n * branches * sum(k - j)`` evaluations per image. Intermediate
    scores are x0 estimates at different noise levels, so they are not comparable from round
    to round; only the last round scores finished images. Needs a single-step scheduler (steps
    are re-run after re-noising).
    """
    check_options(n=n, num_steps=num_steps, branches=branches, start=start, backtrack=backtrack, advance=advance)
    if keeps_history(adapter.scheduler):
        raise single_step_error("path-search", adapter, "re-runs steps after re-noising")
    run = SearchRun(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
    first, plan = path_plan(run.steps, start, backtrack, advance)
    b, m = run.batch, branches
    rows = [i for i in range(b) for _ in range(n)]
    x = torch.cat([run.noise(i, n) for i in range(b)]) * run.scale
    x, _ = run.denoise(x, rows, 0, first, run.step_generators(rows))
    nfe = n * first
    history: dict[str, list] = {"round_best": [], "round_mean": [], "rounds": []}
    branch_rows = [i for i in range(b) for _ in range(n * m)]
    images = scores = None
    for i, j, k in plan:
        eps = torch.cat([run.noise(p, n * m) for p in range(b)])
        start_j = _renoise(adapter, run.sched, x.repeat_interleave(m, dim=0), i, j, eps)
        x_k, x0 = run.denoise(start_j, branch_rows, j, k, run.step_generators(branch_rows), want_x0=k < run.steps)
        nfe += n * m * (k - j)
        if k == run.steps:
            images = run.decode(x_k)
            scores = run.score(images, branch_rows).view(b, n * m)
        else:
            scores = run.score(run.decode(x0), branch_rows).view(b, n * m)
            top = scores.topk(n, dim=1).indices  # [B, n]
            flat = (torch.arange(b)[:, None] * (n * m) + top).flatten()
            x = x_k[flat.to(x_k.device)]
        history["round_best"].append(scores.max(dim=1).values)
        history["round_mean"].append(scores.mean(dim=1))
        history["rounds"].append([i, j, k])
    best, pick = scores.max(dim=1)
    chosen = images.view(b, n * m, *images.shape[1:])[torch.arange(b), pick.to(images.device)]
    output = SamplerOutput(chosen, best, [nfe] * b, {**history_lists(history), "reward_images": run.reward_images})
    return output if return_output else chosen


OPTIONS = ("branches", "start", "backtrack", "advance", "batch_size")


def check_options(*, n: int, num_steps: int, **options: Any) -> None:
    """A one-line ValueError naming the option for a bad path-search setting (no model needed)."""
    check_common("path-search", OPTIONS, n=n, num_steps=num_steps, options=options)
    get = options.get
    positive_int("path-search branches", get("branches", 1))
    path_plan(num_steps, get("start"), get("backtrack"), get("advance"))
