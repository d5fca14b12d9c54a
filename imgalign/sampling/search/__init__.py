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

from typing import Any

from . import noise, paths, speculative
from .common import SamplerOutput
from .noise import NoiseSearch, noise_search_sample, search_noise
from .paths import path_plan, path_search_sample
from .speculative import prune_steps, speculative_sample

__all__ = [
    "NoiseSearch",
    "SamplerOutput",
    "check_search_options",
    "noise_search_sample",
    "path_plan",
    "path_search_sample",
    "prune_steps",
    "search_noise",
    "speculative_sample",
]

_CHECKS = {"noise-search": noise.check_options, "path-search": paths.check_options,
           "speculative": speculative.check_options}  # fmt: skip


def check_search_options(sampler: str, *, n: int, num_steps: int, **options: Any) -> None:
    """Raise a one-line ValueError naming the option for a bad search setting (no model needed).

    The samplers call their own check on entry; the CLI calls this before loading anything.
    """
    if sampler not in _CHECKS:
        raise ValueError(f"unknown search sampler {sampler!r}; choose one of {', '.join(_CHECKS)}")
    _CHECKS[sampler](n=n, num_steps=num_steps, **options)
