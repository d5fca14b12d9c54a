"""Segment-routed sampling: one LoRA per range of noise levels, each active only in its range.

AlignHuman (Liang et al. 2025, "Improving Motion and Fidelity via Timestep-Segment Preference
Optimization", arXiv:2506.11144) observed that sampling steps decide different things: the
early, high-noise steps the layout and motion, the late, low-noise steps fidelity and detail.
Its timestep-segment preference optimisation (TPO, :mod:`imgalign.train.segment_dpo`) trains
one LoRA expert per segment of the noise range, and at inference each expert must run in its
own segment and nowhere else: that is this sampler. The paper also runs a segment with fewer
steps ("step skipping": 100 -> 30 function evaluations with little loss); ``skip`` does that.

Segments are ranges of :meth:`pipelines.DiffusionAdapter.noise_level` (0 clean, 1 pure
noise: the flow models' sigma, or ``t / num_train_timesteps``), given by boundaries
``[0, b1, ..., 1]``: segment ``k`` covers ``[b_k, b_{k+1})``, the last one includes 1. With
``[0, 0.5, 1]``, ``seg0`` is the low-noise half (late steps: detail), ``seg1`` the high-noise
half (early steps: layout).

The TPO trainer writes ``routing.json`` beside its per-segment LoRA directories::

    {"format": "imgalign-segment-routing", "version": 1,
     "boundaries": [0.0, 0.5, 1.0], "adapters": ["seg0", "seg1"]}

``adapters[k]`` is segment ``k``'s LoRA directory (relative to the file) and its adapter name;
``null`` runs the base model (all adapters off) in that segment.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pipelines
from pipelines import DiffusionAdapter, Schedule, cond_batch_size

__all__ = [
    "ROUTING_FILE",
    "SegmentPlan",
    "SegmentRouting",
    "load_routing",
    "load_segment_loras",
    "plan_segments",
    "sample_segments",
    "save_routing",
]

ROUTING_FILE = "routing.json"
ROUTING_FORMAT = "imgalign-segment-routing"
ROUTING_VERSION = 1
# An adapter name is also a directory name beside routing.json, and peft keeps adapters in
# module dicts (no dots): plain names only, no paths.
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


# ============================================================================ routing
@dataclass(frozen=True)
class SegmentRouting:
    """Which LoRA adapter runs in which range of noise levels (``None``: the base model)."""

    boundaries: list[float]
    adapters: list[str | None]

    def __post_init__(self) -> None:
        b = self.boundaries
        if (
            len(b) < 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in b)
            or b[0] != 0
            or b[-1] != 1
            or any(lo >= hi for lo, hi in zip(b, b[1:], strict=False))
        ):
            raise ValueError(f"segment boundaries must increase strictly from 0 to 1 (e.g. [0, 0.5, 1]), got {list(b)}")
        if len(self.adapters) != len(b) - 1:
            raise ValueError(
                f"{len(b) - 1} segments (boundaries {list(b)}) need {len(b) - 1} adapters, got {len(self.adapters)}"
            )
        for name in self.adapters:
            if name is not None and not (isinstance(name, str) and _ADAPTER_NAME.fullmatch(name)):
                raise ValueError(f"segment adapter names are plain names (letters, digits, _ and -) or null, got {name!r}")

    @classmethod
    def even(cls, adapters: Sequence[str | None]) -> SegmentRouting:
        """``len(adapters)`` segments of equal width."""
        n = len(adapters)
        return cls([k / n for k in range(n + 1)], list(adapters))

    @property
    def num_segments(self) -> int:
        return len(self.adapters)

    def segment_of(self, noise_level: float) -> int:
        """The segment ``k`` with ``b_k <= noise_level < b_{k+1}`` (a level of 1 is in the last one)."""
        if not 0 <= noise_level <= 1:
            raise ValueError(f"a noise level lies in [0, 1], got {noise_level}")
        return min(bisect.bisect_right(self.boundaries, noise_level) - 1, self.num_segments - 1)

    def to_dict(self) -> dict[str, Any]:
        return {"format": ROUTING_FORMAT, "version": ROUTING_VERSION, "boundaries": [float(b) for b in self.boundaries],
                "adapters": list(self.adapters)}  # fmt: skip


def save_routing(routing: SegmentRouting, path: str | os.PathLike) -> Path:
    """Write ``routing.json`` atomically (temporary file, then rename); ``path`` is the file or its directory."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / ROUTING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..io import atomic_write_bytes  # ordinary permissions (umask), not mkstemp's 0600

    atomic_write_bytes(path, (json.dumps(routing.to_dict(), indent=2) + "\n").encode())
    return path


def load_routing(path: str | os.PathLike) -> SegmentRouting:
    """Read a routing file, given as ``routing.json`` or as the directory that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUTING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"segment routing file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ROUTING_FORMAT:
        raise ValueError(f"{path} is not a segment routing file (no \"format\": \"{ROUTING_FORMAT}\")")
    if data.get("version") != ROUTING_VERSION:
        raise ValueError(f"{path} has routing version {data.get('version')!r}; this imgalign reads version {ROUTING_VERSION}")
    if not isinstance(data.get("boundaries"), list) or not isinstance(data.get("adapters"), list):
        raise ValueError(f"{path} needs a \"boundaries\" list and an \"adapters\" list")
    try:
        return SegmentRouting(data["boundaries"], data["adapters"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_segment_loras(adapter: DiffusionAdapter, routing: SegmentRouting, directory: str | os.PathLike) -> list[str]:
    """Load each segment's LoRA from ``directory/<name>`` under its name; return the names loaded.

    ``directory`` is where ``routing.json`` lives. A name used by several segments loads once.
    """
    directory = Path(directory)
    if directory.suffix == ".json":
        directory = directory.parent
    names = list(dict.fromkeys(n for n in routing.adapters if n is not None))
    loaded = pipelines.lora_names(adapter)
    for name in names:
        if name in loaded:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded on this pipeline")
        pipelines.load_lora(adapter, directory / name, adapter_name=name)
    return names


# ============================================================================ the plan
@dataclass(frozen=True)
class SegmentPlan:
    """The steps a segment-routed run takes, and the segment of each.

    ``function_evaluations`` counts sampler steps: one guided model prediction each
    (``adapter.predict``; with classifier-free guidance that is one batched forward of both
    branches for most families, two forwards for FLUX's true CFG), the convention of
    AlignHuman's "100 -> 30 NFE".
    """

    schedule: Schedule
    segments: list[int]  # segment of step i
    noise_levels: list[float]  # noise level where step i starts
    steps_per_segment: list[int]
    # How the steps are taken. None / False: the adapter's own scheduler on its own schedule.
    scheduler: Any = None  # flow skip: a FlowMatchEulerDiscreteScheduler holding the custom sigmas
    ddim: bool = False  # epsilon/v skip: deterministic DDIM between the plan's timesteps

    @property
    def function_evaluations(self) -> int:
        return len(self.schedule)


def plan_segments(
    adapter: DiffusionAdapter,
    routing: SegmentRouting,
    num_steps: int,
    *,
    skip: Mapping[int, int] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> SegmentPlan:
    """The schedule of ``num_steps`` steps, each step's segment, and with ``skip={k: K}`` segment
    ``k`` re-run with ``K`` steps.

    A skipped segment keeps its noise range: its first and last steps start where they did in
    the ``num_steps`` schedule, with ``K`` evenly spaced levels from the one to the other (one
    level, the first, when ``K = 1``); the other segments keep their steps exactly. So every
    level stays inside its segment, and the segment's adapter is the one that runs there. This
    needs a scheduler that can step a custom schedule: flow-matching Euler (custom sigmas) or,
    for epsilon/v models, DDIM (custom timesteps). Calls ``adapter.schedule(num_steps)``, which
    sets the scheduler's timesteps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    skip = dict(skip or {})
    if skip:
        _check_skippable(adapter)
    full = adapter.schedule(num_steps, height=height, width=width)
    levels = [adapter.noise_level(full, i) for i in range(len(full))]
    segments = [routing.segment_of(level) for level in levels]
    for k, count in skip.items():
        if not 0 <= k < routing.num_segments:
            raise ValueError(f"cannot skip steps in segment {k}: the routing has segments 0..{routing.num_segments - 1}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"segment {k} needs at least 1 step, got {count!r}")
        if k not in segments:
            raise ValueError(f"segment {k} {routing.boundaries[k:k + 2]} holds no step of a {num_steps}-step schedule")
    if not skip:
        return SegmentPlan(full, segments, levels, _count(segments, routing.num_segments))
    if any(a < b for a, b in zip(segments, segments[1:], strict=False)):
        raise ValueError("step skipping needs a schedule whose noise levels only fall; this one rises at some step")
    runs = [(k, [i for i, s in enumerate(segments) if s == k]) for k in dict.fromkeys(segments)]
    if adapter.is_flow:
        return _flow_plan(adapter, routing, full, runs, skip)
    return _ddim_plan(adapter, routing, full, runs, skip)


def _count(segments: list[int], n: int) -> list[int]:
    return [segments.count(k) for k in range(n)]


def _check_skippable(adapter: DiffusionAdapter) -> None:
    """Can the adapter's scheduler step a custom schedule (and do we know how)?"""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = adapter.scheduler
    if adapter.is_flow:
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.get("invert_sigmas", False):
            raise ValueError(f"step skipping needs FlowMatchEulerDiscreteScheduler (custom sigmas); {adapter.family} "
                             f"uses {type(scheduler).__name__}: call adapter.set_scheduler('flow-euler') first")  # fmt: skip
        return
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"step skipping needs DDIMScheduler (custom timesteps) for {adapter.prediction_type} models; "
                         f"{adapter.family} uses {type(scheduler).__name__}: call adapter.set_scheduler('ddim') first")  # fmt: skip
    if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
        raise ValueError("step skipping takes plain DDIM steps: turn the scheduler's clip_sample and thresholding off")


def _flow_plan(adapter, routing, full: Schedule, runs, skip) -> SegmentPlan:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = adapter.scheduler
    sigmas = full.sigmas.double().cpu().numpy()
    planned: list[np.ndarray] = []
    for k, steps in runs:
        first, last = sigmas[steps[0]], sigmas[steps[-1]]
        if k in skip and skip[k] > 1 and first == last:
            raise ValueError(f"segment {k} holds one step (noise level {first:.4g}): it cannot be spread over {skip[k]} steps")
        planned.append(np.linspace(first, last, skip[k]) if k in skip else sigmas[steps[0] : steps[-1] + 1])
    # The sigmas are final: a copy of the scheduler with every shift and re-spacing off takes them as given.
    custom = FlowMatchEulerDiscreteScheduler.from_config(
        scheduler.config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False,
    )  # fmt: skip
    custom.set_timesteps(sigmas=np.concatenate(planned).astype(np.float32), device=full.timesteps.device)
    schedule = Schedule(custom.timesteps, full.height, full.width, sigmas=custom.sigmas.to(torch.float32))
    levels = [float(s) for s in schedule.sigmas[:-1]]
    segments = [routing.segment_of(level) for level in levels]
    return SegmentPlan(schedule, segments, levels, _count(segments, routing.num_segments), scheduler=custom)


def _ddim_plan(adapter, routing, full: Schedule, runs, skip) -> SegmentPlan:
    timesteps = full.timesteps.cpu().tolist()
    planned: list[int] = []
    for k, steps in runs:
        first, last = timesteps[steps[0]], timesteps[steps[-1]]
        if k not in skip:
            planned += timesteps[steps[0] : steps[-1] + 1]
        elif skip[k] > first - last + 1:
            raise ValueError(f"segment {k} spans timesteps {first}..{last}: it cannot take {skip[k]} distinct steps")
        else:  # round half up: evenly spaced reals at least 1 apart stay distinct integers
            planned += np.floor(np.linspace(first, last, skip[k]) + 0.5).astype(int).tolist()
    ts = torch.tensor(planned, dtype=full.timesteps.dtype, device=full.timesteps.device)
    schedule = Schedule(ts, full.height, full.width, prev_timesteps=torch.cat([ts[1:], ts.new_tensor([-1])]))
    levels = [adapter.noise_level(schedule, i) for i in range(len(schedule))]
    segments = [routing.segment_of(level) for level in levels]
    return SegmentPlan(schedule, segments, levels, _count(segments, routing.num_segments), ddim=True)


@contextmanager
def _stepping_with(adapter: DiffusionAdapter, plan: SegmentPlan) -> Iterator[None]:
    """The plan's scheduler in the pipeline while it runs (a flow skip plan's custom sigmas)."""
    if plan.scheduler is None:
        yield
        return
    original = adapter.scheduler
    adapter.set_scheduler(plan.scheduler)
    try:
        yield
    finally:
        adapter.set_scheduler(original)


# ============================================================================ the sampler
@torch.no_grad()
def sample_segments(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    routing: SegmentRouting,
    *,
    num_steps: int = 30,
    skip: Mapping[int, int] | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Any = None,
    latents: torch.Tensor | None = None,
    **cond_kwargs: Any,
) -> torch.Tensor:
    """The pipeline's deterministic loop, with segment ``k``'s adapter (only it) active at its steps.

    ``routing``'s adapters must be loaded on ``adapter`` (:func:`load_segment_loras`).
    ``skip={k: K}`` runs segment ``k`` with ``K`` steps (:func:`plan_segments`; its
    ``function_evaluations`` is the count to tabulate quality against). ``guidance_scale``
    None is the family's default; ``cond_kwargs`` go to ``encode_prompt`` (e.g. ``image=`` for
    edit models). The adapters' on/off state is restored afterwards. Returns images
    [B,3,H,W] in [0,1]; a single segment ``[0, 1]`` gives exactly the images of
    ``adapter.sample`` with that LoRA active.
    """
    loaded = pipelines.lora_names(adapter)
    for name in routing.adapters:
        if name is not None and name not in loaded:
            raise ValueError(f"segment adapter {name!r} is not loaded (loaded: {', '.join(loaded) or 'none'}); "
                             "load it with load_segment_loras(adapter, routing, directory)")  # fmt: skip
    if guidance_scale is not None:
        cond_kwargs["guidance_scale"] = guidance_scale
    cond = adapter.encode_prompt(prompts, **cond_kwargs)
    plan = plan_segments(adapter, routing, num_steps, skip=skip, height=height, width=width)
    sched = plan.schedule
    x = latents if latents is not None else adapter.prepare_latents(cond_batch_size(cond), sched.height, sched.width, generator)
    ddim_noise = torch.Generator(x.device).manual_seed(0)  # eta = 0: drawn, then multiplied by 0
    with pipelines.lora_state_restored(adapter), _stepping_with(adapter, plan):
        current = -1
        for i in range(len(sched)):
            if plan.segments[i] != current:
                current = plan.segments[i]
                pipelines.set_active_lora(adapter, routing.adapters[current])
            out = adapter.predict(x, sched, i, cond)
            if plan.ddim:
                x = adapter.step_with_logprob(out, sched, i, x, method="ddim", noise_level=0.0, generator=ddim_noise).prev_sample
            else:
                x = adapter.step(out, sched, i, x, generator)
    return adapter.decode(x)
