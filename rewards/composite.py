"""Weighted sums of rewards, with per-reward normalisation.

``total = sum_i w_i * (r_i - m_i) / s_i`` where, for each member reward ``i``:

* ``normalize="auto"`` (default): ``(m_i, s_i)`` are the published constants of the reward
  (``reward.info.mean/std``) when it has them, else running statistics;
* ``normalize="running"``: running statistics for every member;
* ``normalize="none"``: ``m_i = 0, s_i = 1`` (plain weighted sum).

Running statistics use Welford's algorithm over every scored image; they are updated only
in training mode (``composite.train()``) and frozen in eval mode, so evaluation is
deterministic. Until two values have been seen they are ``(0, 1)``. They are buffers, so
they are saved with ``state_dict()``.

The raw and normalised per-reward values of the last call are in ``last_components`` /
``last_normalized``; :meth:`CompositeReward.score_components` returns the raw ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import Reward, RewardInfo

__all__ = ["CompositeReward", "RunningStats"]


class RunningStats(nn.Module):
    """Welford mean/variance over a stream of scalars (float64 buffers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        # Chan et al. parallel merge of the batch statistics == sequential Welford updates.
        x = values.detach().double().flatten().to(self.mean.device)
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean()
        m2_b = ((x - mean_b) ** 2).sum()
        n_a = self.count.clone()
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * n_a * n_b / n
        self.count.copy_(n)

    @property
    def std(self) -> Tensor:
        if self.count < 2:
            return torch.ones((), dtype=torch.float64, device=self.mean.device)
        return (self.m2 / (self.count - 1)).sqrt().clamp_min(1e-8)

    @property
    def current_mean(self) -> Tensor:
        return self.mean if self.count >= 2 else torch.zeros_like(self.mean)


class CompositeReward(Reward):
    """A reward that is a weighted sum of normalised rewards."""

    def __init__(self, members: Mapping[str, tuple[Reward, float]] | Mapping[str, Reward], *, normalize: str = "auto",
                 weights: Mapping[str, float] | None = None):
        super().__init__()
        if normalize not in ("auto", "running", "none"):
            raise ValueError(f"normalize must be 'auto', 'running' or 'none', got {normalize!r}")
        if not members:
            raise ValueError("a CompositeReward needs at least one member reward")
        self.rewards = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.stats = nn.ModuleDict()
        self.constants: dict[str, tuple[float, float]] = {}
        inputs: list[str] = ["images"]
        for name, value in members.items():
            reward, weight = value if isinstance(value, tuple) else (value, (weights or {}).get(name, 1.0))
            if not isinstance(reward, Reward):
                raise TypeError(f"member {name!r} is a {type(reward).__name__}, not a Reward")
            if not math.isfinite(float(weight)):
                raise ValueError(f"the weight of reward {name!r} must be a finite number, got {weight!r}")
            key = name.replace(".", "_")  # ModuleDict keys cannot contain dots
            self.rewards[key] = reward
            self.weights[name] = float(weight)
            info = reward.info
            if normalize == "none":
                self.constants[name] = (0.0, 1.0)
            elif normalize == "auto" and info.mean is not None and info.std is not None:
                self.constants[name] = (float(info.mean), float(info.std))
            else:
                self.stats[key] = RunningStats()
            for i in info.inputs:
                if i not in inputs:
                    inputs.append(i)
        self._names = list(self.weights)
        self.info = RewardInfo(
            name="+".join(f"{n}*{w:g}" for n, w in self.weights.items()),
            inputs=tuple(inputs),
            differentiable=all(r.info.differentiable for r in self.rewards.values()),
            source="weighted sum of: " + ", ".join(self._names),
            score_range=None,
        )
        self.last_components: dict[str, Tensor] = {}
        self.last_normalized: dict[str, Tensor] = {}

    def member(self, name: str) -> Reward:
        return self.rewards[name.replace(".", "_")]

    def normalization(self, name: str) -> tuple[float, float]:
        """Current ``(mean, std)`` applied to member ``name``."""
        if name in self.constants:
            return self.constants[name]
        st = self.stats[name.replace(".", "_")]
        return float(st.current_mean), float(st.std)

    def _score(self, images: Tensor, prompts, **cond: Tensor) -> Tensor:
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        raw: dict[str, Tensor] = {}
        normed: dict[str, Tensor] = {}
        for name in self._names:
            key = name.replace(".", "_")
            reward = self.rewards[key]
            kw = {k: v for k, v in cond.items() if k in reward.info.inputs}
            r = reward(images, prompts if reward.info.needs_prompts else None, **kw).float().to(images.device)
            if key in self.stats:
                if self.training:
                    self.stats[key].update(r)
                st = self.stats[key]
                m, s = st.current_mean.to(r), st.std.to(r)
            else:
                m, s = (torch.tensor(c, device=r.device, dtype=r.dtype) for c in self.constants[name])
            n = (r - m) / s
            raw[name], normed[name] = r, n
            total = total + self.weights[name] * n
        self.last_components, self.last_normalized = raw, normed
        return total

    def score_components(self, images: Tensor, prompts=None, **cond: Tensor) -> dict[str, Tensor]:
        """Raw per-reward scores (plus ``"total"``) for one call of the composite."""
        total = self(images, prompts, **cond)
        return {**self.last_components, "total": total}
