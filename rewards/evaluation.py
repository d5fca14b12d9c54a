"""Metrics for reward models against human preferences.

Conventions follow EditReward's ``evaluate/eval_bench.py`` (``TIGER-AI-Lab/EditReward``):
``h`` are human labels (``1`` A preferred, ``-1`` B preferred, ``0`` tie) and ``m`` are model
margins ``score(A) - score(B)``.

* :func:`pairwise_accuracy` -- accuracy without ties: human ties are left out; a model
  margin of exactly 0 counts as discordant (``calc_accuracy_without_ties``).
* :func:`accuracy_with_ties` -- the tie-calibrated accuracy of Deutsch, Foster & Freitag
  (2023, "Ties Matter", arXiv 2305.14324): a margin ``|m| <= epsilon`` is a model tie, an
  outcome is right when both agree on the winner or both call a tie, and ``epsilon`` is
  chosen to maximise accuracy over the candidates ``{0} U {|m_i|}``
  (``calc_accuracy_with_ties_for_edit_reward_bench``). The older incremental version in the
  same file also visits partial thresholds when several ``|m|`` are equal and never tries
  "no model ties"; we evaluate whole thresholds only. Sorting makes it ``O(N log N)``.
* :func:`group_accuracy` -- EditReward-Bench's strict ranking accuracy for K-way groups: a
  group counts when the model's full ranking equals the human one; a 2-way human tie counts
  when ``|s_0 - s_1| <= epsilon`` (the epsilon found by :func:`accuracy_with_ties`).
* :func:`spearman`, :func:`kendall_tau` against per-item human scores (tie-corrected: average
  ranks; Kendall's tau-b).
* :func:`reliability` -- predicted preference probability vs observed frequency per bin,
  the expected calibration error, and :func:`plot_reliability` (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TieCounts",
    "accuracy_with_ties",
    "format_markdown_table",
    "group_accuracy",
    "kendall_tau",
    "pairwise_accuracy",
    "parse_ranking",
    "plot_reliability",
    "reliability",
    "spearman",
    "tie_counts",
]


@dataclass(frozen=True)
class TieCounts:
    """Deutsch et al.'s sufficient statistics at one epsilon.

    ``concordant``: same winner; ``discordant``: opposite winner; ``human_tie``: human tie,
    model not; ``model_tie``: model tie, human not; ``both_tie``.
    """

    concordant: int
    discordant: int
    human_tie: int
    model_tie: int
    both_tie: int

    @property
    def accuracy(self) -> float:
        total = self.concordant + self.discordant + self.human_tie + self.model_tie + self.both_tie
        return (self.concordant + self.both_tie) / total if total else 0.0


def _arrays(h, m) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(h, dtype=np.float64).reshape(-1)
    m = np.asarray(m, dtype=np.float64).reshape(-1)
    if h.shape != m.shape:
        raise ValueError(f"{h.size} human labels but {m.size} model margins")
    if not np.isin(h, (-1.0, 0.0, 1.0)).all():
        raise ValueError("human labels must be 1 (A preferred), -1 (B preferred) or 0 (tie)")
    return h, m


def tie_counts(h, m, epsilon: float) -> TieCounts:
    """Counts at one epsilon (``epsilon < 0``: the model never ties)."""
    h, m = _arrays(h, m)
    model_tie = np.abs(m) <= epsilon
    human_tie = h == 0
    agree = h * m > 0
    return TieCounts(
        concordant=int((~human_tie & ~model_tie & agree).sum()),
        discordant=int((~human_tie & ~model_tie & ~agree).sum()),
        human_tie=int((human_tie & ~model_tie).sum()),
        model_tie=int((~human_tie & model_tie).sum()),
        both_tie=int((human_tie & model_tie).sum()),
    )


def pairwise_accuracy(h, m) -> float:
    """Accuracy without ties: ``C / (C + D)`` over pairs the humans did not tie."""
    counts = tie_counts(h, m, -1.0)
    decided = counts.concordant + counts.discordant
    return counts.concordant / decided if decided else float("nan")


def accuracy_with_ties(h, m) -> tuple[float, float]:
    """``(accuracy, epsilon)``: the tie-calibrated pairwise accuracy and the epsilon achieving it.

    Candidates are ``0`` and every distinct ``|m|``; among equal accuracies the smallest
    epsilon wins (the reference's strict ``>``).
    """
    h, m = _arrays(h, m)
    n = h.size
    if n == 0:
        return float("nan"), 0.0
    size = np.abs(m)
    order = np.argsort(size, kind="stable")
    size, h_sorted, m_sorted = size[order], h[order], m[order]
    # Correct when the model ties: human tie. Correct when it does not: same sign.
    right_if_tie = (h_sorted == 0).astype(np.int64)
    right_if_not = ((h_sorted != 0) & (h_sorted * m_sorted > 0)).astype(np.int64)
    tie_prefix = np.concatenate([[0], np.cumsum(right_if_tie)])
    not_suffix = np.concatenate([np.cumsum(right_if_not[::-1])[::-1], [0]])
    candidates = np.concatenate([[0.0], np.unique(size)])
    best_acc, best_eps = -1.0, 0.0
    for epsilon in candidates:
        k = int(np.searchsorted(size, epsilon, side="right"))  # items 0..k-1 are model ties
        acc = (tie_prefix[k] + not_suffix[k]) / n
        if acc > best_acc:
            best_acc, best_eps = float(acc), float(epsilon)
    return best_acc, best_eps


def parse_ranking(ranking, k: int) -> tuple[int, ...] | str:
    """A human ranking as item indices, best first, or ``"tie"`` (2-way tie).

    Accepts ``"C>A>B"`` (letters name items), ``"A=B"`` / ``"A=B=Good"`` (tie, K=2 only),
    a list of indices best first, or a preference label for K=2 ("A", "B", "tie").
    """
    if isinstance(ranking, str):
        text = ranking.strip().upper().replace(" ", "")
        if k == 2 and text in ("A", "B", "TIE", "A=B", "A=B=GOOD", "A=B=BAD", "B<A", "A<B"):
            return {"A": (0, 1), "B": (1, 0), "B<A": (0, 1), "A<B": (1, 0)}.get(text, "tie")
        if "=" in text:
            raise ValueError(f"ranking {ranking!r}: ties are only supported for two items")
        letters = text.replace(">", "")
        order = tuple(ord(c) - ord("A") for c in letters)
    else:
        order = tuple(int(i) for i in ranking)
    if sorted(order) != list(range(k)):
        raise ValueError(f"ranking {ranking!r} is not a permutation of {k} items")
    return order


def group_accuracy(groups: Sequence[tuple[Sequence[float], tuple[int, ...] | str]], epsilon: float = 0.0) -> float:
    """Strict ranking accuracy over groups ``(scores, human ranking)``; see the module doc."""
    if not groups:
        return float("nan")
    correct = 0
    for scores, ranking in groups:
        scores = np.asarray(scores, dtype=np.float64)
        if ranking == "tie":
            correct += bool(abs(scores[0] - scores[1]) <= epsilon)
        else:
            model_order = tuple(int(i) for i in np.argsort(-scores, kind="stable"))
            correct += model_order == tuple(ranking)
    return correct / len(groups)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    for value in np.unique(x):  # ties share their mean rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of average ranks (NaN when one side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size:
        raise ValueError(f"{x.size} predictions but {y.size} human scores")
    if x.size < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected), ``O(N^2)`` memory-light loop over rows."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size != y.size:
        raise ValueError(f"{x.size} predictions but {y.size} human scores")
    concordant_minus_discordant = 0.0
    pairs_untied_x = pairs_untied_y = 0.0
    for i in range(x.size - 1):
        sx = np.sign(x[i + 1:] - x[i])
        sy = np.sign(y[i + 1:] - y[i])
        concordant_minus_discordant += float((sx * sy).sum())
        pairs_untied_x += float((sx != 0).sum())
        pairs_untied_y += float((sy != 0).sum())
    den = math.sqrt(pairs_untied_x * pairs_untied_y)
    return concordant_minus_discordant / den if den > 0 else float("nan")


def reliability(probabilities, outcomes, num_bins: int = 10) -> dict:
    """Binned calibration of predicted preference probabilities.

    ``probabilities``: predicted ``P(A preferred)``; ``outcomes``: observed ``1`` / ``0`` /
    ``0.5`` (tie). Returns bin edges, mean prediction, observed frequency and count per bin,
    and the expected calibration error (count-weighted ``|observed - predicted|``).
    """
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    o = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if p.size != o.size:
        raise ValueError(f"{p.size} probabilities but {o.size} outcomes")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, num_bins - 1)
    predicted, observed, counts = [], [], []
    ece = 0.0
    for b in range(num_bins):
        mask = which == b
        n = int(mask.sum())
        counts.append(n)
        predicted.append(float(p[mask].mean()) if n else float("nan"))
        observed.append(float(o[mask].mean()) if n else float("nan"))
        if n:
            ece += n * abs(observed[-1] - predicted[-1])
    return {"edges": edges.tolist(), "predicted": predicted, "observed": observed, "counts": counts,
            "ece": ece / p.size if p.size else float("nan")}


def plot_reliability(curve: dict, path: str | os.PathLike, title: str = "reliability") -> None:
    """Save a reliability diagram (observed vs predicted, with the diagonal) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    pts = [(p, o) for p, o, n in zip(curve["predicted"], curve["observed"], curve["counts"]) if n]
    if pts:
        ax.plot(*zip(*pts), "o-", color="tab:blue", label=f"model (ECE {curve['ece']:.3f})")
    ax.set_ylabel("observed P(A preferred)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    edges = curve["edges"]
    hist.bar(edges[:-1], curve["counts"], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.6)
    hist.set_xlabel("predicted P(A preferred)")
    hist.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats with 4 decimals, missing values as ``-``."""
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    """JSON with NaN written as ``null`` (strict JSON readers reject NaN)."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(report), indent=2)
