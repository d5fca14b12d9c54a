"""What the search samplers share: their output, argument checks, and one call's chunked model work."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines import Conditioning, DiffusionAdapter

from ..best_of_n import draw_seed, per_prompt_generators

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


# ============================================================================ shared pieces
def randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (CPU without one), then moved."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device)


def select_rows(kwargs: dict[str, Any], batch: int, rows: Sequence[int]) -> dict[str, Any]:
    """Per-prompt conditioning keywords (tensors or lists with one entry per prompt) for ``rows``."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            value = value[torch.as_tensor(list(rows), device=value.device)]
        elif isinstance(value, list | tuple) and len(value) == batch:
            value = [value[r] for r in rows]
        out[key] = value
    return out


def sample_guidance(adapter: DiffusionAdapter, guidance_scale: float | None) -> float:
    """``guidance_scale``, or the default of ``adapter.sample`` (what the ``ode`` sampler uses)."""
    if guidance_scale is not None:
        return guidance_scale
    return inspect.signature(adapter.sample).parameters["guidance_scale"].default


def keeps_history(scheduler: Any) -> bool:
    """Multistep schedulers (DPM-Solver, UniPC, PNDM, LMS, Heun) build a step on the ones before it."""
    return getattr(scheduler, "order", 1) > 1 or any(hasattr(scheduler, a) for a in ("model_outputs", "ets", "derivatives"))


def single_step_error(sampler: str, adapter: DiffusionAdapter, why: str) -> ValueError:
    single = "flow-euler" if adapter.is_flow else "ddim"
    return ValueError(f"{sampler} {why}, which a multistep scheduler ({type(adapter.scheduler).__name__}) cannot do: "
                      f"call adapter.set_scheduler('{single}') first")  # fmt: skip


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SearchRun:
    """One sampler call: prompts, reward, schedule, per-prompt generators, and chunked model work."""

    def __init__(
        self, adapter: DiffusionAdapter, prompts: str | Sequence[str], reward: Any, num_steps: int,
        guidance_scale: float | None, height: int | None, width: int | None, generator: Generators,
        batch_size: int | None, cond_kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        if reward is None:
            raise ValueError("a search sampler needs a reward")
        positive_int("num_steps", num_steps)
        if batch_size is not None:
            positive_int("batch_size", batch_size)
        self.adapter, self.reward, self.batch_size = adapter, reward, batch_size
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.generators = per_prompt_generators(generator, len(self.prompts))
        self.guidance = sample_guidance(adapter, guidance_scale)
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
        return randn((count, *self.latent_shape), self.generators[i], self.device)

    def step_generators(self, rows: Sequence[int]) -> list[torch.Generator]:
        """A fresh generator per row, seeded from its prompt's generator (stochastic schedulers' step noise)."""
        return [torch.Generator("cpu").manual_seed(draw_seed(self.generators[r])) for r in rows]

    def encode(self, rows: Sequence[int]) -> Conditioning:
        kwargs = select_rows(self.cond_kwargs, self.batch, rows)
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


def history_lists(history: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Per-round tensors [B] -> nested lists (rounds x images) for JSON."""
    return {key: [v.tolist() if isinstance(v, torch.Tensor) else v for v in values] for key, values in history.items()}


def check_common(sampler: str, known: Sequence[str], *, n: int, num_steps: int, options: dict[str, Any]) -> None:
    """The checks every search sampler shares: no unknown option, positive counts and batch size."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{sampler} has no option {unknown[0]!r}; its options: {', '.join(known)}")
    positive_int(f"{sampler} n (candidates)", n)
    positive_int("num_steps", num_steps)
    if options.get("batch_size") is not None:
        positive_int(f"{sampler} batch_size", options["batch_size"])
