"""Evaluate a generator: K images per prompt with fixed seeds, scored by rewards, with intervals.

The measuring stick for alignment. Uncertainty is over prompts: a 95% percentile bootstrap
(Efron & Tibshirani 1993, ch. 13) resamples prompts, not images, because images of one
prompt are correlated. ``compare`` gives the paired bootstrap interval of a gain (same
prompts and seeds before and after), which is what says whether an alignment run helped.
Diversity is the mean pairwise distance between the K images of a prompt (root-mean-square
pixel distance; ImageReFL measures the same idea with DINO features).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SampleFn = Callable[[list[str], list[torch.Generator]], torch.Tensor]


def bootstrap_interval(per_prompt: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_prompt`` values."""
    values = np.asarray(per_prompt, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of the images of one prompt (0 for a single image)."""
    if images.shape[0] < 2:
        return 0.0
    flat = images.flatten(1).double()
    dists = [torch.sqrt(((flat[i] - flat[j]) ** 2).mean()).item() for i, j in itertools.combinations(range(len(flat)), 2)]
    return float(np.mean(dists))


@dataclass
class EvalResult:
    prompts: list[str]
    images_per_prompt: int
    scores: dict[str, np.ndarray]  # reward -> [P, K]
    diversity: np.ndarray  # [P]
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the oracle's per-attribute accuracy
    images: torch.Tensor | None = None  # [P*K, 3, H, W]
    aspects: dict[str, np.ndarray] = field(default_factory=dict)  # "<judge>/<aspect>" -> [P, K]

    def per_prompt(self, reward: str) -> np.ndarray:
        """Mean over a prompt's images of a reward, or of a judge's aspect (``shapes-oracle/exact``)."""
        values = self.scores.get(reward, self.aspects.get(reward))
        if values is None:
            raise KeyError(f"no reward or judge aspect {reward!r}; have {', '.join([*self.scores, *self.aspects])}")
        return values.mean(axis=1)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_prompts": len(self.prompts), "images_per_prompt": self.images_per_prompt}
        for name in self.scores:
            values = self.per_prompt(name)
            lo, hi = bootstrap_interval(values)
            out[name] = {"mean": float(values.mean()), "ci95": [lo, hi]}
        lo, hi = bootstrap_interval(self.diversity)
        out["diversity"] = {"mean": float(self.diversity.mean()), "ci95": [lo, hi]}
        out.update(self.details)
        return out


def evaluate(
    sample: SampleFn,
    prompts: Sequence[str],
    rewards: dict[str, Any],
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    keep_images: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Generate and score. Image ``j`` of prompt ``p`` uses seed ``seed + p * K + j``.

    ``sample(prompts, generators) -> images [B,3,H,W] in [0,1]``. A reward whose optional
    :meth:`rewards.Reward.details` gives a per-image breakdown (the Shapes oracle does) also
    contributes its summary (``<name>/attributes``) and per-image aspects (``<name>/exact``,
    ``<name>/colour``, ...) for paired comparisons.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    k = images_per_prompt
    jobs = [(p, seed + i * k + j) for i, p in enumerate(prompts) for j in range(k)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="evaluating", unit="batch", disable=not progress):
        chunk = jobs[start : start + batch_size]
        with torch.no_grad():
            out = sample([p for p, _ in chunk], [torch.Generator("cpu").manual_seed(s) for _, s in chunk])
        images.append(out.float().cpu())
    all_images = torch.cat(images)
    texts = [p for p, _ in jobs]
    scores, details, aspects = {}, {}, {}
    for name, reward in rewards.items():
        with torch.no_grad():
            values = reward.score_batched(all_images, texts, batch_size=batch_size)
            # over the whole set, so the summary covers every image; on the reward's device (--reward-device)
            rows = reward.details(all_images.to(reward.device), texts)
        scores[name] = values.float().cpu().numpy().reshape(len(prompts), k)
        if rows is not None:
            details[f"{name}/attributes"] = reward.summarize_details(rows)
            for aspect in rows[0] if rows else ():
                per_image = np.array([float(row[aspect]) for row in rows])
                aspects[f"{name}/{aspect}"] = per_image.reshape(len(prompts), k)
    diversity = np.array([pairwise_diversity(all_images[i * k : (i + 1) * k]) for i in range(len(prompts))])
    return EvalResult(prompts, k, scores, diversity, details, all_images if keep_images else None, aspects)


def score_images(rewards: dict[str, Any], images: torch.Tensor, texts: list[str], *, batch_size: int = 64,
                 ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:  # fmt: skip
    """Per-image scores ``{reward: [B]}`` and per-image details ``{reward: [row, ...]}`` (rewards that give them).

    What :func:`evaluate` computes over the whole set, for one batch: a command that writes
    each batch's images and scores as it goes (``imgalign eval``) keeps them per image, so
    an interrupted evaluation resumes without scoring anything twice.
    """
    scores, details = {}, {}
    for name, reward in rewards.items():
        with torch.no_grad():
            scores[name] = [float(v) for v in reward.score_batched(images, texts, batch_size=batch_size).float().cpu()]
            rows = reward.details(images.to(reward.device), texts)
        if rows is not None:
            details[name] = [{k: float(v) for k, v in row.items()} for row in rows]
    return scores, details


def result_from_records(prompts: Sequence[str], images_per_prompt: int, records: Sequence[dict[str, Any]],
                        images: torch.Tensor, rewards: dict[str, Any]) -> EvalResult:  # fmt: skip
    """An :class:`EvalResult` from per-image records (``scores``, optional ``details``) in job order.

    ``images``: the saved (8-bit) images, so that a resumed evaluation, which reads the
    finished ones back from their PNGs, reports exactly what an uninterrupted one does.
    """
    k, n = images_per_prompt, len(prompts)
    scores = {name: np.array([r["scores"][name] for r in records], dtype=np.float64).reshape(n, k) for name in rewards}
    details, aspects = {}, {}
    for name, reward in rewards.items():
        rows = [r.get("details", {}).get(name) for r in records]
        if rows and all(row is not None for row in rows):
            details[f"{name}/attributes"] = reward.summarize_details(rows)
            for aspect in rows[0]:
                aspects[f"{name}/{aspect}"] = np.array([float(row[aspect]) for row in rows]).reshape(n, k)
    diversity = np.array([pairwise_diversity(images[i * k : (i + 1) * k]) for i in range(n)])
    return EvalResult(list(prompts), k, scores, diversity, details, images, aspects)


def compare(before: EvalResult, after: EvalResult, reward: str, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Gain after - before on the same prompts and seeds, with a paired bootstrap 95% interval."""
    if before.prompts != after.prompts or before.images_per_prompt != after.images_per_prompt:
        raise ValueError("compare needs the same prompts and images per prompt before and after")
    return paired_gain(before.per_prompt(reward), after.per_prompt(reward), n_resamples=n_resamples, seed=seed)


def paired_gain(before: np.ndarray, after: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of per-prompt ``after - before`` with its paired bootstrap 95% interval."""
    diff = np.asarray(after) - np.asarray(before)
    lo, hi = bootstrap_interval(diff, n_resamples=n_resamples, seed=seed)
    return {"before": float(np.asarray(before).mean()), "after": float(np.asarray(after).mean()),
            "gain": float(diff.mean()), "ci95": [lo, hi], "significant": bool(lo > 0 or hi < 0)}  # fmt: skip


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per reward (mean and interval), then the oracle attributes if present."""
    lines = ["| metric | mean | 95% interval |", "|---|---|---|"]
    for name, value in summary.items():
        if isinstance(value, dict) and "mean" in value:
            lo, hi = value["ci95"]
            lines.append(f"| {name} | {value['mean']:.4f} | [{lo:.4f}, {hi:.4f}] |")
    for name, value in summary.items():
        if name.endswith("/attributes"):
            lines += ["", f"| {name} | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in value.items() if k != "n"]
    return "\n".join(lines)
