"""Speculative rejection on denoising steps: many candidates, the worst dropped by their x0's reward, the best finished."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from pipelines import Conditioning, DiffusionAdapter

from ..best_of_n import candidate_seeds
from .common import (Generators, SamplerOutput, check_common, history_lists, keeps_history, sample_guidance,
                     select_rows, single_step_error)  # fmt: skip


def prune_steps(num_steps: int, prune_at: Sequence[int] | None) -> list[int]:
    """The steps before which speculative rejection prunes: ``prune_at``, or ``T // 3`` and ``2T // 3``."""
    if prune_at is None:
        prune_at = [num_steps // 3, (2 * num_steps) // 3]
        prune_at = [s for s in prune_at if 1 <= s < num_steps]
    steps = sorted(set(prune_at))
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < num_steps:
            raise ValueError(f"speculative prune_at steps must be in [1, num_steps - 1 = {num_steps - 1}], got {s!r}")
    return steps


def speculative_sample(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    reward: Any,
    n: int = 8,
    prune_at: Sequence[int] | None = None,
    prune_fraction: float = 0.5,
    num_steps: int = 30,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Generators = None,
    return_output: bool = False,
    **cond_kwargs: Any,
) -> torch.Tensor | SamplerOutput:
    """Speculative rejection: best-of-``n`` that stops the candidates the reward already dislikes.

    Candidate ``c`` of image ``i`` starts from exactly the noise best-of-``n`` gives it
    (:func:`~imgalign.sampling.best_of_n.candidate_seeds`). Before each step ``s`` of ``prune_at``
    (default ``T // 3`` and ``2T // 3``), each live candidate is scored by the reward of the x0
    estimate of its last prediction (step ``s - 1``, no extra evaluation), and per image the
    lowest ``floor(prune_fraction * live)`` are dropped (at least one survives). Survivors are
    finished, scored as images, and the best is returned. A candidate dropped before step ``s``
    cost ``s`` evaluations. With ``prune_at=()`` or ``prune_fraction=0`` this is
    :func:`~imgalign.sampling.best_of_n_sample`: the same images and scores, bit for bit (each
    candidate index runs as one batch over the images, as best-of-N runs it, with its own copy
    of the scheduler).

    Sun et al. 2024 (arXiv:2410.20290) reject partial generations of a language model by a
    reward model's score of the partial text; here the partial generation is a noisy latent
    and the reward reads its x0 estimate.
    """
    check_options(n=n, num_steps=num_steps, prune_at=prune_at, prune_fraction=prune_fraction)
    if reward is None:
        raise ValueError("a search sampler needs a reward")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    seeds = candidate_seeds(generator, b, n)
    guidance = sample_guidance(adapter, guidance_scale)
    sched = adapter.schedule(num_steps, height=height, width=width)
    t = len(sched)
    pruning = prune_steps(t, prune_at) if prune_fraction > 0 else []
    if pruning and keeps_history(adapter.scheduler):
        raise single_step_error("speculative pruning", adapter, "drops candidates from batches mid-run")
    encoded: dict[tuple[int, ...], Conditioning] = {}

    def encode(rows: list[int]) -> Conditioning:
        if tuple(rows) not in encoded:
            kwargs = select_rows(cond_kwargs, b, rows)
            encoded[tuple(rows)] = adapter.encode_prompt([prompts[r] for r in rows], guidance_scale=guidance, **kwargs)
        return encoded[tuple(rows)]

    # Candidate column c: one batch over the images where it is alive, as best-of-N samples it.
    columns = []
    for c in range(n):
        gens = [torch.Generator("cpu").manual_seed(seeds[i][c]) for i in range(b)]
        x = adapter.prepare_latents(b, sched.height, sched.width, gens)
        columns.append({"rows": list(range(b)), "x": x, "gens": gens, "scheduler": copy.deepcopy(adapter.scheduler),
                        "last": None})  # fmt: skip
    nfe = [0] * b
    reward_images = [0] * b
    history: dict[str, list] = {"prune_steps": pruning, "alive": [], "round_best": [], "round_mean": []}
    original = adapter.scheduler
    try:
        with torch.no_grad():
            for i in range(t):
                if i in pruning:
                    _prune(adapter, sched, columns, prompts, reward, i, prune_fraction, reward_images, history)
                for col in columns:
                    if not col["rows"]:
                        continue
                    adapter.set_scheduler(col["scheduler"])
                    out = adapter.predict(col["x"], sched, i, encode(col["rows"]))
                    col["last"] = (out, col["x"])
                    col["x"] = adapter.step(out, sched, i, col["x"], col["gens"])
                    for r in col["rows"]:
                        nfe[r] += 1
            finals = {(r, c): image for c, col in enumerate(columns) if col["rows"]
                      for r, image in zip(col["rows"], adapter.decode(col["x"]), strict=True)}  # fmt: skip
    finally:
        adapter.set_scheduler(original)
    keys = [(r, c) for r in range(b) for c in range(n) if (r, c) in finals]
    with torch.no_grad():
        flat = reward.score_batched(torch.stack([finals[key] for key in keys]), [prompts[r] for r, _ in keys]).float()
    for r, _ in keys:
        reward_images[r] += 1
    table = torch.full((b, n), -math.inf)
    for (r, c), s in zip(keys, flat.cpu(), strict=True):
        table[r, c] = s
    scores, pick = table.max(dim=1)
    images = torch.stack([finals[(r, int(pick[r]))] for r in range(b)])
    output = SamplerOutput(images, scores, nfe, {**history_lists(history), "reward_images": reward_images,
                                                 "survivors": [sum(1 for rr, _ in keys if rr == r) for r in range(b)]})  # fmt: skip
    return output if return_output else images


def _prune(adapter, sched, columns, prompts, reward, i, fraction, reward_images, history) -> None:
    """Score live candidates by their x0 estimates at step ``i - 1``; drop the worst ``fraction`` per image."""
    live = [(r, c, k) for c, col in enumerate(columns) for k, r in enumerate(col["rows"])]
    estimates = []
    for col in columns:
        if col["rows"]:
            out, x_in = col["last"]
            estimates.append(adapter.decode(adapter.pred_x0(out, sched, i - 1, x_in)))
    scores = reward.score_batched(torch.cat(estimates), [prompts[r] for r, _, _ in live]).float().cpu()
    per_image: dict[int, list[tuple[float, int]]] = {}
    for (r, c, _), s in zip(live, scores.tolist(), strict=True):
        per_image.setdefault(r, []).append((s, c))
        reward_images[r] += 1
    dropped = set()
    for r, entries in per_image.items():
        drop = min(int(math.floor(fraction * len(entries))), len(entries) - 1)
        for _, c in sorted(entries, key=lambda e: e[0])[:drop]:  # stable: ties drop the lower index first
            dropped.add((r, c))
    for c, col in enumerate(columns):
        keep = [k for k, r in enumerate(col["rows"]) if (r, c) not in dropped]
        if len(keep) == len(col["rows"]):
            continue
        index = torch.as_tensor(keep, dtype=torch.long, device=col["x"].device)
        col["rows"] = [col["rows"][k] for k in keep]
        col["x"] = col["x"][index]
        col["gens"] = [col["gens"][k] for k in keep]
        col["last"] = None
    b = len(prompts)
    best = torch.full((b,), -math.inf)
    mean = torch.zeros(b)
    for r, entries in per_image.items():
        best[r] = max(s for s, _ in entries)
        mean[r] = sum(s for s, _ in entries) / len(entries)
    history["alive"].append([sum(1 for col in columns for rr in col["rows"] if rr == r) for r in range(b)])
    history["round_best"].append(best)
    history["round_mean"].append(mean)


OPTIONS = ("prune_at", "prune_fraction")


def check_options(*, n: int, num_steps: int, **options: Any) -> None:
    """A one-line ValueError naming the option for a bad speculative setting (no model needed)."""
    check_common("speculative", OPTIONS, n=n, num_steps=num_steps, options=options)
    get = options.get
    fraction = get("prune_fraction", 0.5)
    if not (isinstance(fraction, int | float) and 0 <= fraction < 1):
        raise ValueError(f"speculative prune_fraction must be in [0, 1), got {fraction!r}")
    if fraction > 0:
        prune_steps(num_steps, get("prune_at"))
