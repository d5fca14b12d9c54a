"""Combined generation and the AIG interpolation baseline (Sorokin et al. 2025, arXiv:2505.22569).

Reward-tuned models lose diversity mostly through the *early* steps, which fix the layout.
Combined generation runs the base model for the first ``k`` of ``T`` steps and the tuned
model for the rest (§3 of the paper; the released models use ``k = 30`` of 40 for SD1.5 and
35 for SDXL). With a LoRA the base model is the same network with the adapter disabled
(``pipelines.lora_disabled``), so there is never a second model in memory.

AIG ("adaptive interpolation guidance", the paper's baseline) mixes the two predictions at
every step instead: ``out = s_i * out_base + (1 - s_i) * out_tuned`` with
``s_i = 1 - (i / T)^p``: all base at ``i = 0``, increasingly tuned towards the end.

Both samplers use the adapter's deterministic steps, so ``switch_step = T`` reproduces the
base model's ``adapter.sample`` exactly and ``switch_step = 0`` the tuned model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pipelines import Conditioning, DiffusionAdapter, cond_batch_size, lora_disabled

__all__ = ["aig_base_weights", "aig_sample", "combined_sample"]


def aig_base_weights(num_steps: int, power: float) -> list[float]:
    """``s_i = 1 - (i / T)^p`` for ``i = 0..T-1``: the base model's share at each step."""
    if power < 0:
        raise ValueError(f"the AIG power must be >= 0, got {power}")
    return [1.0 - (i / num_steps) ** power for i in range(num_steps)]


@contextlib.contextmanager
def _as_base(adapter: DiffusionAdapter, base: DiffusionAdapter | None) -> Iterator[DiffusionAdapter]:
    """The base model: a separate adapter if given, else ``adapter`` with its LoRA disabled."""
    if base is not None:
        yield base
        return
    with lora_disabled(adapter):
        yield adapter


def _prepare(
    adapter: DiffusionAdapter,
    base: DiffusionAdapter | None,
    prompts: str | Sequence[str],
    num_steps: int,
    guidance_scale: float | None,
    base_guidance_scale: float | None,
    height: int | None,
    width: int | None,
    generator: Any,
    latents: torch.Tensor | None,
    cond_kwargs: dict[str, Any],
):
    def encode(model: DiffusionAdapter, scale: float | None) -> Conditioning:
        kwargs = dict(cond_kwargs)
        if scale is not None:
            kwargs["guidance_scale"] = scale
        return model.encode_prompt(prompts, **kwargs)

    tuned_cond = encode(adapter, guidance_scale)
    same = base is None and (base_guidance_scale is None or base_guidance_scale == guidance_scale)
    base_cond = tuned_cond if same else encode(base or adapter, base_guidance_scale if base_guidance_scale is not None else guidance_scale)
    sched = adapter.schedule(num_steps, height=height, width=width)
    if base is not None:
        base.schedule(num_steps, height=height, width=width)  # its scheduler scales the model input
    if latents is None:
        latents = adapter.prepare_latents(cond_batch_size(tuned_cond), sched.height, sched.width, generator)
    return tuned_cond, base_cond, sched, latents


@torch.no_grad()
def combined_sample(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    switch_step: int,
    num_steps: int = 40,
    guidance_scale: float | None = None,
    base_guidance_scale: float | None = None,
    base: DiffusionAdapter | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Any = None,
    latents: torch.Tensor | None = None,
    **cond_kwargs: Any,
) -> torch.Tensor:
    """Base model for steps ``[0, switch_step)``, tuned model for ``[switch_step, T)``.

    ``adapter`` is the tuned model (a LoRA loaded on it, or a fully fine-tuned pipeline with
    ``base`` given). ``base_guidance_scale`` lets the base steps use their own CFG scale
    (ImageReFL's base runs at 7.5). ``cond_kwargs`` go to ``encode_prompt`` (e.g. ``image=``
    for edit models). Returns images [B,3,H,W] in [0,1].
    """
    if not 0 <= switch_step <= num_steps:
        raise ValueError(f"switch_step must be in [0, {num_steps}], got {switch_step}")
    tuned_cond, base_cond, sched, x = _prepare(
        adapter, base, prompts, num_steps, guidance_scale, base_guidance_scale, height, width, generator, latents,
        cond_kwargs,
    )  # fmt: skip
    for i in range(len(sched)):
        if i < switch_step:
            with _as_base(adapter, base) as model:
                out = model.predict(x, sched, i, base_cond)
        else:
            out = adapter.predict(x, sched, i, tuned_cond)
        x = adapter.step(out, sched, i, x, generator)
    return adapter.decode(x)


@torch.no_grad()
def aig_sample(
    adapter: DiffusionAdapter,
    prompts: str | Sequence[str],
    *,
    power: float = 1.0,
    num_steps: int = 40,
    guidance_scale: float | None = None,
    base_guidance_scale: float | None = None,
    base: DiffusionAdapter | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: Any = None,
    latents: torch.Tensor | None = None,
    **cond_kwargs: Any,
) -> torch.Tensor:
    """AIG: ``out = s_i out_base + (1 - s_i) out_tuned`` with ``s_i = 1 - (i/T)^power``.

    Two denoiser calls per step (one with the LoRA disabled); a weight of exactly 0 or 1
    skips the call that would not contribute.
    """
    tuned_cond, base_cond, sched, x = _prepare(
        adapter, base, prompts, num_steps, guidance_scale, base_guidance_scale, height, width, generator, latents,
        cond_kwargs,
    )  # fmt: skip
    for i, s in enumerate(aig_base_weights(len(sched), power)):
        out = None
        if s > 0:
            with _as_base(adapter, base) as model:
                out = model.predict(x, sched, i, base_cond)
        if s < 1:
            tuned = adapter.predict(x, sched, i, tuned_cond)
            out = tuned if out is None else s * out + (1 - s) * tuned
        x = adapter.step(out, sched, i, x, generator)
    return adapter.decode(x)
