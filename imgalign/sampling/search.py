"""Test-time search: spend more denoiser calls on one image and let a reward pick where they go.

Four searches over the sampling of a frozen model, all guided by a reward (a
:class:`rewards.Reward`, scored without gradients) and all sharing the call shape of the
other samplers (``sampler(adapter, prompts, *, reward, n, ..., num_steps, guidance_scale,
height, width, generator, **cond_kwargs)``):

* :func:`search_noise`: Smart-GRPO's noise search (Yu et al. 2025, "Smart-GRPO: Smartly
  Sampling Noise for Efficient RL of Flow-Matching Models", arXiv:2510.02654): a per-prompt
  Gaussian over the initial noise, refitted round after round to the candidates whose
  one-step decode the reward likes. Smart-GRPO's trainer draws its rollouts from it; the
  ``noise-search`` sampler then samples from the best noise it found.
* :func:`noise_search_sample` with ``method="zero-order"``: Ma et al. 2025 ("Inference-Time
  Scaling for Diffusion Models beyond Scaling Denoising Steps", arXiv:2501.09732, §3.2, zero-order
  search): full samples from candidates near a pivot noise; the pivot moves to the best one
  when it beats the pivot.
* :func:`path_search_sample`: the same paper's search over paths: denoise N paths part way,
  re-noise each a little M times, denoise further, keep the N best branches, repeat.
* :func:`speculative_sample`: speculative rejection (Sun et al. 2024, "Fast Best-of-N Decoding
  via Speculative Rejection", arXiv:2410.20290, for language models) on denoising steps:
  many candidates, the worst fraction dropped at a few intermediate steps by the reward of
  their x0 estimates, the best survivor returned. Without pruning it is best-of-N, image for
  image and score for score.

Function evaluations
--------------------
``nfe`` counts denoiser predictions: one prediction for one image at one step is one
function evaluation, and a classifier-free-guidance pair (conditional and unconditional
branch, in one batched forward or two) counts as one, as in :class:`SegmentPlan` and the
sampling literature's NFE. A sampler's ``nfe`` for an output image is everything spent on
it: every candidate, branch and search round. Reward calls and VAE decodes are not
function evaluations (they are reported as ``reward_images``: images the reward scored).
Plain sampling costs ``num_steps``; best-of-N ``n * num_steps``.

Determinism: every random draw for output image ``i`` comes from image ``i``'s own
generator (or from a fresh generator seeded from it), so a fixed list of generators gives a
fixed result, and output ``i`` does not depend on the other images of the batch.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pipelines import Conditioning, DiffusionAdapter, Schedule

from .best_of_n import candidate_seeds, draw_seed, per_prompt_generators

__all__ = [
    "NoiseSearch",
    "SamplerOutput",
    "check_search_options",
    "noise_search_sample",
    "path_search_sample",
    "search_noise",
    "speculative_sample",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SamplerOutput:
    """What a reward-guided sampler returns with ``return_output=True``.

    ``images`` [B,3,H,W] in [0,1]; ``scores`` [B]: the guiding reward of each returned image
    (None for samplers without a reward); ``nfe``: function evaluations spent per image (module
    docstring); ``history``: the search's per-round numbers (lists over rounds of per-image values).
    """

    images: torch.Tensor
    scores: torch.Tensor | None
    nfe: list[int]
    history: dict[str, Any] = field(default_factory=dict)


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
        eps = torch.stack([_randn((per_prompt, *self.mean.shape[1:]), g, self.mean.device) for g in generators])
        return (self.mean[:, None] + self.std[:, None] * eps).flatten(0, 1)


# ============================================================================ shared pieces
def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (CPU without one), then moved."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device)


def _select(kwargs: dict[str, Any], batch: int, rows: Sequence[int]) -> dict[str, Any]:
    """Per-prompt conditioning keywords (tensors or lists with one entry per prompt) for ``rows``."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            value = value[torch.as_tensor(list(rows), device=value.device)]
        elif isinstance(value, list | tuple) and len(value) == batch:
            value = [value[r] for r in rows]
        out[key] = value
    return out


def _sample_guidance(adapter: DiffusionAdapter, guidance_scale: float | None) -> float:
    """``guidance_scale``, or the default of ``adapter.sample`` (what the ``ode`` sampler uses)."""
    if guidance_scale is not None:
        return guidance_scale
    return inspect.signature(adapter.sample).parameters["guidance_scale"].default


def _keeps_history(scheduler: Any) -> bool:
    """Multistep schedulers (DPM-Solver, UniPC, PNDM, LMS, Heun) build a step on the ones before it."""
    return getattr(scheduler, "order", 1) > 1 or any(hasattr(scheduler, a) for a in ("model_outputs", "ets", "derivatives"))


def _single_step_error(sampler: str, adapter: DiffusionAdapter, why: str) -> ValueError:
    single = "flow-euler" if adapter.is_flow else "ddim"
    return ValueError(f"{sampler} {why}, which a multistep scheduler ({type(adapter.scheduler).__name__}) cannot do: "
                      f"call adapter.set_scheduler('{single}') first")  # fmt: skip


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _Run:
    """One sampler call: prompts, reward, schedule, per-prompt generators, and chunked model work."""

    def __init__(
        self, adapter: DiffusionAdapter, prompts: str | Sequence[str], reward: Any, num_steps: int,
        guidance_scale: float | None, height: int | None, width: int | None, generator: Generators,
        batch_size: int | None, cond_kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        if reward is None:
            raise ValueError("a search sampler needs a reward")
        _positive_int("num_steps", num_steps)
        if batch_size is not None:
            _positive_int("batch_size", batch_size)
        self.adapter, self.reward, self.batch_size = adapter, reward, batch_size
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.generators = per_prompt_generators(generator, len(self.prompts))
        self.guidance = _sample_guidance(adapter, guidance_scale)
        self.cond_kwargs = cond_kwargs
        self.num_steps, self.height, self.width = num_steps, height, width
        self.sched = adapter.schedule(num_steps, height=height, width=width)
        probe = adapter.prepare_latents(1, self.sched.height, self.sched.width, torch.Generator("cpu").manual_seed(0))
        self.latent_shape, self.latent_dtype = tuple(probe.shape[1:]), probe.dtype
        # Euler-type schedulers start from N(0, init_noise_sigma^2); flow and VP ones from N(0, I).
        self.scale = float(getattr(adapter.scheduler, "init_noise_sigma", 1.0))
        self.reward_images = [0] * len(self.prompts)

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def steps(self) -> int:
        return len(self.sched)

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def noise(self, i: int, count: int) -> torch.Tensor:
        """``count`` standard normal latents from prompt ``i``'s generator (float32)."""
        return _randn((count, *self.latent_shape), self.generators[i], self.device)

    def step_generators(self, rows: Sequence[int]) -> list[torch.Generator]:
        """A fresh generator per row, seeded from its prompt's generator (stochastic schedulers' step noise)."""
        return [torch.Generator("cpu").manual_seed(draw_seed(self.generators[r])) for r in rows]

    def encode(self, rows: Sequence[int]) -> Conditioning:
        kwargs = _select(self.cond_kwargs, self.batch, rows)
        return self.adapter.encode_prompt([self.prompts[r] for r in rows], guidance_scale=self.guidance, **kwargs)

    def chunks(self, count: int) -> Iterable[slice]:
        size = self.batch_size or max(count, 1)
        return (slice(lo, min(lo + size, count)) for lo in range(0, count, size))

    @torch.no_grad()
    def denoise(
        self, x: torch.Tensor, rows: Sequence[int], start: int, end: int, generators: Sequence[Any] | None = None,
        *, want_x0: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Deterministic steps ``[start, end)`` of the schedule for latents ``x`` (row ``k`` is prompt ``rows[k]``).

        Returns the latents at ``end`` and, with ``want_x0``, the x0 estimate of the last
        prediction made (at step ``end - 1``; free: the step needed that prediction anyway).
        """
        adapter, sched = self.adapter, self.sched
        outs, estimates = [], []
        for part in self.chunks(len(rows)):
            if start == 0:  # a fresh run: reset the scheduler as adapter.sample does
                adapter.schedule(self.num_steps, height=self.height, width=self.width)
            cond = self.encode(rows[part])
            xc = x[part].to(self.latent_dtype)
            gens = list(generators[part]) if generators is not None else None
            out, x_in = None, xc
            for i in range(start, end):
                out, x_in = adapter.predict(xc, sched, i, cond), xc
                xc = adapter.step(out, sched, i, xc, gens)
            outs.append(xc)
            if want_x0 and out is not None:
                estimates.append(adapter.pred_x0(out, sched, end - 1, x_in))
        return torch.cat(outs), (torch.cat(estimates) if estimates else None)

    @torch.no_grad()
    def one_step_x0(self, z: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """x0 estimated from the first step's prediction at initial latents ``z`` (one evaluation each)."""
        estimates = []
        for part in self.chunks(len(rows)):
            zc = z[part].to(self.latent_dtype)
            out = self.adapter.predict(zc, self.sched, 0, self.encode(rows[part]))
            estimates.append(self.adapter.pred_x0(out, self.sched, 0, zc))
        return torch.cat(estimates)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adapter.decode(latents[part]) for part in self.chunks(len(latents))])

    @torch.no_grad()
    def score(self, images: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """The guiding reward of ``images`` (float32, CPU)."""
        for r in rows:
            self.reward_images[r] += 1
        scores = self.reward.score_batched(images, [self.prompts[r] for r in rows])
        return scores.float().cpu()


def _history_lists(history: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Per-round tensors [B] -> nested lists (rounds x images) for JSON."""
    return {key: [v.tolist() if isinstance(v, torch.Tensor) else v for v in values] for key, values in history.items()}


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
    _positive_int("rounds", rounds)
    _positive_int("candidates", candidates)
    keep = max(1, candidates // 4) if keep is None else _positive_int("keep", keep)
    if keep > candidates:
        raise ValueError(f"keep must be <= candidates ({candidates}), got {keep}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not (math.isfinite(std_floor) and std_floor >= 0):
        raise ValueError(f"std_floor must be a finite number >= 0, got {std_floor}")
    run = _Run(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
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
    check_search_options("noise-search", n=n, num_steps=num_steps, method=method, rounds=rounds, keep=keep,
                         smoothing=smoothing, std_floor=std_floor, radius=radius)  # fmt: skip
    if method == "smart":
        found = search_noise(
            adapter, prompts, reward=reward, num_steps=num_steps, guidance_scale=guidance_scale, height=height,
            width=width, rounds=rounds, candidates=n, keep=keep, smoothing=smoothing, std_floor=std_floor,
            generator=generator, batch_size=batch_size, **cond_kwargs,
        )  # fmt: skip
        run = _Run(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
        rows = list(range(run.batch))
        run.reward_images = [found.nfe] * run.batch  # one-step decodes scored during the search
        x, _ = run.denoise(found.best_noise, rows, 0, run.steps, run.step_generators(rows))
        images = run.decode(x)
        scores = run.score(images, rows)
        history = {"round_best": found.round_best, "round_mean": found.round_mean, "one_step_best": [found.best_score]}
        nfe = [found.nfe + run.steps] * run.batch
    else:
        run = _Run(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
        images, scores, nfe, history = _zero_order(run, n=n, rounds=rounds, radius=radius)
    output = SamplerOutput(images, scores, nfe, {**_history_lists(history), "reward_images": run.reward_images})
    return output if return_output else images


def _zero_order(run: _Run, *, n: int, rounds: int, radius: float):
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


# ============================================================================ search over paths
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
    backtrack = max(1, t // 10) if backtrack is None else _positive_int("path-search backtrack", backtrack)
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
    check_search_options("path-search", n=n, num_steps=num_steps, branches=branches, start=start,
                         backtrack=backtrack, advance=advance)  # fmt: skip
    if _keeps_history(adapter.scheduler):
        raise _single_step_error("path-search", adapter, "re-runs steps after re-noising")
    run = _Run(adapter, prompts, reward, num_steps, guidance_scale, height, width, generator, batch_size, cond_kwargs)
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
    output = SamplerOutput(chosen, best, [nfe] * b, {**_history_lists(history), "reward_images": run.reward_images})
    return output if return_output else chosen


# ============================================================================ speculative rejection
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
    check_search_options("speculative", n=n, num_steps=num_steps, prune_at=prune_at, prune_fraction=prune_fraction)
    if reward is None:
        raise ValueError("a search sampler needs a reward")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    b = len(prompts)
    seeds = candidate_seeds(generator, b, n)
    guidance = _sample_guidance(adapter, guidance_scale)
    sched = adapter.schedule(num_steps, height=height, width=width)
    t = len(sched)
    pruning = prune_steps(t, prune_at) if prune_fraction > 0 else []
    if pruning and _keeps_history(adapter.scheduler):
        raise _single_step_error("speculative pruning", adapter, "drops candidates from batches mid-run")
    encoded: dict[tuple[int, ...], Conditioning] = {}

    def encode(rows: list[int]) -> Conditioning:
        if tuple(rows) not in encoded:
            kwargs = _select(cond_kwargs, b, rows)
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
    output = SamplerOutput(images, scores, nfe, {**_history_lists(history), "reward_images": reward_images,
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


# ============================================================================ option checks
_OPTIONS = {
    "noise-search": ("method", "rounds", "keep", "smoothing", "std_floor", "radius", "batch_size"),
    "path-search": ("branches", "start", "backtrack", "advance", "batch_size"),
    "speculative": ("prune_at", "prune_fraction"),
}


def check_search_options(sampler: str, *, n: int, num_steps: int, **options: Any) -> None:
    """Raise a one-line ValueError naming the option for a bad search setting (no model needed).

    The samplers call it on entry; the CLI calls it before loading anything.
    """
    if sampler not in _OPTIONS:
        raise ValueError(f"unknown search sampler {sampler!r}; choose one of {', '.join(_OPTIONS)}")
    unknown = sorted(set(options) - set(_OPTIONS[sampler]))
    if unknown:
        raise ValueError(f"{sampler} has no option {unknown[0]!r}; its options: {', '.join(_OPTIONS[sampler])}")
    _positive_int(f"{sampler} n (candidates)", n)
    _positive_int("num_steps", num_steps)
    get = options.get
    if sampler == "noise-search":
        method = get("method", "smart")
        if method not in ("smart", "zero-order"):
            raise ValueError(f"noise-search method must be 'smart' or 'zero-order', got {method!r}")
        _positive_int("noise-search rounds", get("rounds", 1))
        if method == "smart":
            keep = get("keep")
            keep = max(1, n // 4) if keep is None else _positive_int("noise-search keep", keep)
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
    elif sampler == "path-search":
        _positive_int("path-search branches", get("branches", 1))
        path_plan(num_steps, get("start"), get("backtrack"), get("advance"))
    else:
        fraction = get("prune_fraction", 0.5)
        if not (isinstance(fraction, int | float) and 0 <= fraction < 1):
            raise ValueError(f"speculative prune_fraction must be in [0, 1), got {fraction!r}")
        if fraction > 0:
            prune_steps(num_steps, get("prune_at"))
    if get("batch_size") is not None:
        _positive_int(f"{sampler} batch_size", get("batch_size"))
