"""Preference optimisation of a pipeline: Diffusion-DPO and H-DPO, on a pairs dataset or on on-policy pairs.

One recipe, read top to bottom: its config sections, its setup (the shared pipeline setup,
plus the pairs when they come from a file, plus a frozen reference copy under full
fine-tuning), and the step the run skeleton calls::

    SAMPLE  a preference pair per prompt: from the dataset (Pick-a-Pic style: prompt,
            image_0/image_1, label; for edit models also the source image), or on-policy:
            K candidates per prompt from the current model, scored by any reward
            (differentiable or not, e.g. the Shapes oracle or a VLM judge), best vs worst,
            pairs whose score gap is at most ``dpo.margin`` dropped; then winner and loser
            noised to the same step with the same noise
    SCORE   per-sample denoising errors of the policy and of the reference: the same
            network with the LoRA disabled (no second copy in memory) or, under full
            fine-tuning, a frozen copy of the starting weights (``dpo.reference_offload``
            keeps it on the CPU between its forwards)
    LOSS    :func:`imgalign.losses.preference.diffusion_dpo_loss` (``sigmoid``, ``ipo``,
            ``hinge``; ``dpo.alpha`` != 1 is H-DPO), optionally with Diffusion-SDPO's
            winner-preserving scale on the loser (``dpo.winner_preserving``)

The pieces other preference methods reuse live here too: :func:`on_policy_candidates`
(sample and label K candidates per prompt), :func:`dataset_pairs`, :func:`denoising_errors`
(policy and reference errors at one shared step) and :func:`reference_denoiser`. KTO
(:mod:`.kto`), reward-weighted fine-tuning (:mod:`.reward_weighted`) and timestep-segment DPO
(:mod:`.segment_dpo`) are built from them.

Works for epsilon, v and flow models through the adapter's ``predict`` and the forward
process of :mod:`imgalign.train.forward_process` (the target is the model's own
parameterisation). Assumptions of ours, stated because the papers do not fix them for every
family: the training step is drawn uniformly from a ``dpo.num_timesteps``-step schedule of
the model's scheduler (uniform over the training timesteps for epsilon/v models; the
scheduler's shifted sigmas for flow models), and the denoiser runs without classifier-free
guidance on the conditional branch, as in pre-training (``data.caption_dropout`` replaces a
pair's prompt by the empty one with that probability, as DiffusionDPO's
``--proportion_empty_prompts`` does, to keep the unconditional branch trained).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

import pipelines
import rewards
from pipelines import Conditioning

from ..losses.preference import diffusion_dpo_loss, per_sample_error, winner_preserving_scale
from .config import DataConfig, PipelineTrainingConfig
from .data import Batch, PromptData, StepIndexedSampler, read_prompts
from .forward_process import noise_to_step, target_at_step
from .loop import randn_like_per_image
from .pipeline import PipelineTrainee, check_pipeline, sample_images, score, setup_pipeline
from .registry import Method
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class DpoConfig:
    """Diffusion-DPO (Wallace et al. 2024) and H-DPO (Omura et al. 2024)."""

    beta: float = 5000.0  # Wallace et al.: 5000 for SD1.5 / SDXL on Pick-a-Pic v2
    alpha: float = 1.0  # H-DPO: weight of the policy term; 1 is DPO
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    num_timesteps: int = 1000  # the schedule the training step is drawn from
    candidates: int = 2  # on-policy: images sampled per prompt; the pair is the best and the worst
    margin: float = 0.0  # on-policy: drop pairs whose reward gap is at most this
    keep_ties: bool = False  # dataset: train on tied pairs (label 0.5) as well (random order) instead of dropping them
    winner_preserving: bool = False  # Diffusion-SDPO: scale the loser's gradient so the winner's error cannot rise
    reference_offload: bool = False  # full fine-tuning: keep the frozen reference copy on the CPU between forwards


@dataclass
class PreferenceDataConfig(DataConfig):
    """Prompts (on-policy pairs) or a pairs file (JSONL, Parquet or a ``datasets`` directory)."""

    source: Literal["on_policy", "pairs"] = "on_policy"
    pairs: str | None = None  # prompt, image_0/image_1 (paths or bytes), label (A/B/tie, 0/1/0.5)
    skip_bad_rows: bool = False  # train without the rows that fail to load (they are listed) instead of stopping
    caption_dropout: float = 0.0  # probability that a pair trains with the empty prompt


@dataclass
class DpoTrainingConfig(PipelineTrainingConfig):
    method: str = "dpo"
    output_dir: str = "runs/dpo"
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)


def check_preference_data(cfg: PipelineTrainingConfig, candidates: int, section: str) -> None:
    """The data checks every preference method shares (``section``: the method's config section, for messages)."""
    check_pipeline(cfg)
    data: PreferenceDataConfig = cfg.data
    if not 0.0 <= data.caption_dropout < 1.0:
        raise ValueError(f"data.caption_dropout must be in [0, 1), got {data.caption_dropout}")
    if data.source == "on_policy":
        if not cfg.reward:
            raise ValueError("on-policy pairs are labelled by a reward: set reward=<name> (any reward, e.g. shapes-oracle)")
        if candidates < 2:
            raise ValueError(f"{section}.candidates must be >= 2 (candidates per prompt are compared with each other)")
    elif not data.pairs:
        raise ValueError("data.source=pairs needs data.pairs=<JSONL, Parquet or datasets directory of pairs>")
    elif cfg.sampling.height is None or cfg.sampling.height != cfg.sampling.width:
        raise ValueError("a pairs dataset is resized to a square: set sampling.height and sampling.width (equal)")


def check_config(cfg: DpoTrainingConfig) -> None:
    d = cfg.dpo
    if d.beta <= 0 or not math.isfinite(d.beta):
        raise ValueError(f"dpo.beta must be a positive number, got {d.beta}")
    if d.num_timesteps < 1:
        raise ValueError("dpo.num_timesteps must be >= 1")
    check_preference_data(cfg, d.candidates, "dpo")


# ============================================================================ setup
@dataclass
class PreferenceTrainee(PipelineTrainee):
    """The shared pipeline setup, plus the dataset's pairs and, under full fine-tuning, the frozen reference."""

    pairs: list | None = None
    pair_sampler: StepIndexedSampler | None = None
    reference: torch.nn.Module | None = None  # None: the LoRA-disabled network is the reference
    reference_offload: bool = False


def setup_preference(run: Run, *, reference_offload: bool = False, keep_ties: bool = True, reference: bool = True,
                     trainee_class: type[PreferenceTrainee] = PreferenceTrainee, **extra) -> PreferenceTrainee:  # fmt: skip
    """The pipeline (and its reward, to label on-policy pairs), the pairs file if any, and the reference.

    ``reference=False``: the method never runs a reference model (no frozen copy under full fine-tuning).
    """
    cfg = run.cfg
    if cfg.data.source == "on_policy":
        trainee = setup_pipeline(run, needs_reward=True, trainee_class=trainee_class, **extra)
    else:
        pairs = read_preference_pairs(cfg, keep_ties=keep_ties)
        sampler = StepIndexedSampler(len(pairs), cfg.train.batch_size, run.num_processes, cfg.train.seed)
        trainee = setup_pipeline(run, needs_reward=bool(cfg.reward), data=validation_prompts(cfg, [p.prompt or "" for p in pairs]),
                                 trainee_class=trainee_class, pairs=pairs, pair_sampler=sampler, **extra)  # fmt: skip
        if trainee.adapter.is_edit and any(p.source is None for p in pairs):
            raise ValueError(f"{cfg.data.pairs}: an edit model trains on pairs with a source image (source_image column)")
    if reference:
        add_frozen_reference(trainee, offload=reference_offload)
    return trainee


def validation_prompts(cfg: PipelineTrainingConfig, dataset_prompts: Sequence[str]) -> PromptData:
    """What validation samples when the training data is a file: ``validation.prompts``, else
    ``data.prompts``, else the file's own prompts."""
    prompts = cfg.validation.prompts or read_prompts(cfg.data.prompts) or list(dataset_prompts)
    return PromptData(prompts, StepIndexedSampler(len(prompts), 1))


def add_frozen_reference(trainee: PreferenceTrainee, *, offload: bool) -> None:
    """Under full fine-tuning, the reference is a frozen copy of the starting weights (LoRA: the disabled adapter)."""
    if not trainee.cfg.lora.enabled:
        trainee.reference = frozen_copy(trainee.adapter, offload=offload)
        trainee.reference_offload = offload


def read_preference_pairs(cfg: PipelineTrainingConfig, *, keep_ties: bool, path: str | None = None) -> list:
    """The pairs of ``path`` (default ``data.pairs``) at the training size; ties dropped unless ``keep_ties``."""
    from rewards.training import PairDataConfig, load_pairs

    data: PreferenceDataConfig = cfg.data
    path = path or data.pairs
    pairs = load_pairs(path, PairDataConfig(image_size=cfg.sampling.height, skip_bad_rows=data.skip_bad_rows))
    bad = [n for n, p in enumerate(pairs, 1) if math.isnan(p.target)]
    if bad:
        raise ValueError(f"{path}: pairs without a label (rows {bad[:10]}); label them A, B or tie")
    if not keep_ties:
        pairs = [p for p in pairs if p.target != 0.5]
    if not pairs:
        raise ValueError(f"{path}: no pairs left to train on (all ties? set keep_ties=true in the method's section)")
    return pairs


def frozen_copy(adapter: pipelines.DiffusionAdapter, *, offload: bool) -> torch.nn.Module:
    """A frozen copy of the denoiser's current (starting) weights, on the CPU when ``offload``."""
    reference = copy.deepcopy(pipelines.unwrap_model(adapter.denoiser)).requires_grad_(False).eval()
    return reference.to("cpu") if offload else reference


def setup(run: Run) -> PreferenceTrainee:
    d = run.cfg.dpo
    return setup_preference(run, reference_offload=d.reference_offload, keep_ties=d.keep_ties)


# ============================================================================ pieces of SAMPLE
@dataclass
class Candidates:
    """K samples per prompt from the current model and their labelling reward."""

    prompts: list[str]  # [n]
    sources: torch.Tensor | None  # [n, 3, H, W] edit sources
    latents: torch.Tensor  # [n * K, C, h, w], prompt-major
    scores: torch.Tensor  # [n, K]
    images: torch.Tensor  # [n * K, 3, H, W], to label again with another reward


def on_policy_candidates(trainee: PreferenceTrainee, micro: MicroStep, k: int,
                         reward: rewards.Reward | None = None) -> Candidates:  # fmt: skip
    """``k`` samples per prompt of this micro-batch from the current weights, scored by ``reward`` (default: the run's)."""
    batch = trainee.data.batch(micro.index, micro.process_index)
    n = len(batch.prompts)
    repeated = Batch([p for p in batch.prompts for _ in range(k)],
                     None if batch.images is None else batch.images.repeat_interleave(k, 0))  # fmt: skip
    latents, images = sample_images(trainee, repeated, micro.generators("candidates", n * k),
                                    micro.generators("candidate-steps", n * k))  # fmt: skip
    with torch.no_grad():
        values = score(reward or trainee.reward, images, repeated.prompts, repeated.images).float().view(n, k)
    return Candidates(batch.prompts, batch.images, latents.detach(), values.cpu(), images)


@dataclass
class PreferencePairs:
    """Clean latents of winners and losers for one micro-batch, and which pairs to train on."""

    prompts: list[str]
    winners: torch.Tensor  # [B, C, h, w]
    losers: torch.Tensor
    keep: torch.Tensor  # [B] bool
    sources: torch.Tensor | None = None  # [B, 3, H, W] edit sources
    metrics: dict[str, float] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # the labelling reward of every candidate (on-policy)


def best_and_worst(candidates: Candidates, margin: float) -> PreferencePairs:
    """The best and the worst candidate of each prompt; pairs whose gap is at most ``margin`` are not kept."""
    scores, n = candidates.scores, len(candidates.prompts)
    k = scores.shape[1]
    gap = scores.max(1).values - scores.min(1).values
    keep = gap > margin
    rows = torch.arange(n) * k
    latents = candidates.latents
    return PreferencePairs(candidates.prompts, latents[rows + scores.argmax(1)], latents[rows + scores.argmin(1)],
                           keep=keep, sources=candidates.sources, scores=scores.flatten(),
                           metrics={"pair_gap": float(gap.mean()), "pairs_kept": float(keep.float().mean())})  # fmt: skip


def on_policy_pairs(trainee: PreferenceTrainee, micro: MicroStep) -> PreferencePairs:
    """K samples per prompt from the current model, labelled by the reward: best vs worst."""
    d = trainee.cfg.dpo
    return best_and_worst(on_policy_candidates(trainee, micro, d.candidates), d.margin)


def dataset_pairs(trainee: PreferenceTrainee, micro: MicroStep, pairs: list | None = None,
                  sampler: StepIndexedSampler | None = None) -> PreferencePairs:  # fmt: skip
    """Pairs from the dataset (default: the trainee's), encoded to latents; a kept tie in random order."""
    adapter = trainee.adapter
    pairs, sampler = (trainee.pairs, trainee.pair_sampler) if pairs is None else (pairs, sampler)
    chosen = [pairs[i] for i in sampler.indices(micro.index, micro.process_index)]
    a = torch.stack([p.image_a for p in chosen])
    b = torch.stack([p.image_b for p in chosen])
    a_wins = torch.tensor([p.target > 0.5 for p in chosen])
    ties = torch.tensor([p.target == 0.5 for p in chosen])
    if ties.any():  # a tie has no winner: a random order each time it is drawn
        a_wins = torch.where(ties, torch.rand(len(chosen), generator=micro.generators("tie-order", 1)[0]) < 0.5, a_wins)
    winners = torch.where(a_wins.view(-1, 1, 1, 1), a, b)
    losers = torch.where(a_wins.view(-1, 1, 1, 1), b, a)
    size = (trainee.height, trainee.width)
    resize = lambda x: x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", antialias=True)  # noqa: E731
    winners, losers = resize(winners), resize(losers)
    sources = resize(torch.stack([p.source for p in chosen])) if chosen[0].source is not None else None
    with torch.no_grad():
        both = adapter.encode_images(torch.cat([winners, losers]), generator=micro.generators("vae", 2 * len(chosen)))
    w, l = both.chunk(2)
    return PreferencePairs([p.prompt or "" for p in chosen], w, l, keep=torch.ones(len(chosen), dtype=torch.bool),
                           sources=sources)  # fmt: skip


# ============================================================================ pieces of SCORE
@contextlib.contextmanager
def reference_denoiser(trainee: PreferenceTrainee) -> Iterator[None]:
    """Run the reference model in place of the policy: the LoRA-disabled network, or the frozen copy."""
    adapter = trainee.adapter
    if trainee.reference is None:
        with pipelines.lora_disabled(adapter):
            yield
        return
    policy = adapter.denoiser
    if trainee.reference_offload:
        trainee.reference.to(adapter.device)
    adapter.denoiser = trainee.reference
    try:
        yield
    finally:
        adapter.denoiser = policy
        if trainee.reference_offload:
            trainee.reference.to("cpu")


def drop_captions(prompts: Sequence[str], p: float, micro: MicroStep, stream: str = "") -> list[str]:
    """Each prompt replaced by the empty one with probability ``p`` (seeded by the micro-step)."""
    if p <= 0:
        return list(prompts)
    rng = micro.rng(f"{stream}caption-dropout")
    return ["" if rng.random() < p else prompt for prompt in prompts]


@dataclass
class DenoisingErrors:
    """Per-sample denoising errors ``[G * n]`` of the policy (with gradient) and of the reference, at one step."""

    policy: torch.Tensor
    reference: torch.Tensor | None
    step: int  # index into the ``num_timesteps`` schedule
    noise_level: float
    policy_output: torch.Tensor | None = None  # kept for losses on the outputs themselves (a KL to the reference)
    reference_output: torch.Tensor | None = None
    target: torch.Tensor | None = None


def denoising_errors(trainee: PreferenceTrainee, micro: MicroStep, prompts: Sequence[str], x0: torch.Tensor, *,
                     num_timesteps: int, sources: torch.Tensor | None = None, steps: Sequence[int] | None = None,
                     reference: bool = True, keep_outputs: bool = False, stream: str = "") -> DenoisingErrors:  # fmt: skip
    """Noise ``x0`` (``G`` groups of the ``n`` prompts, e.g. winners then losers) to one step and measure both models.

    The step is drawn uniformly from ``steps`` (default: all steps of a ``num_timesteps``
    schedule); the ``G`` copies of each prompt share its noise, as DPO requires of a pair.
    The denoiser runs on the conditional branch only (no guidance), as in pre-training.
    ``stream`` prefixes the random streams, so that several losses in one micro-step draw
    different steps and noises.
    """
    cfg, adapter = trainee.cfg, trainee.adapter
    n = len(prompts)
    groups = len(x0) // n
    prompts = drop_captions(prompts, cfg.data.caption_dropout, micro, stream)
    src = None if sources is None else sources.repeat(groups, 1, 1, 1)
    cond = trainee.encode(list(prompts) * groups, src, guidance=False)
    cond = Conditioning(cond=cond.cond, uncond=None, guidance_scale=1.0, extra=cond.extra)
    schedule = adapter.schedule(num_timesteps, height=trainee.height, width=trainee.width)
    choices = list(range(len(schedule))) if steps is None else list(steps)
    i = choices[micro.rng(f"{stream}timestep").randrange(len(choices))]
    x0 = x0.to(adapter.device)
    noise = randn_like_per_image(x0[:n], micro.generators(f"{stream}noise", n)).repeat(groups, 1, 1, 1).to(x0.dtype)
    x = noise_to_step(adapter, schedule, i, x0, noise)
    target = target_at_step(adapter, schedule, i, x0, noise)
    out = adapter.predict(x, schedule, i, cond)
    ref_out = None
    if reference:
        with torch.no_grad(), reference_denoiser(trainee):
            ref_out = adapter.predict(x, schedule, i, cond)
    return DenoisingErrors(
        per_sample_error(out, target), None if ref_out is None else per_sample_error(ref_out, target), i,
        adapter.noise_level(schedule, i), *((out, ref_out, target) if keep_outputs else (None, None, None)))  # fmt: skip


def winner_preserving_errors(errors: DenoisingErrors, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loser's error with its backward scaled by Diffusion-SDPO's ``lambda`` (one per pair), forward unchanged."""
    g = (errors.policy_output.detach().float() - errors.target.float()).flatten(1)
    scales = torch.tensor([winner_preserving_scale(g[j], g[n + j]) for j in range(n)], device=g.device)
    m_l = errors.policy[n:]
    return m_l.detach() + scales * (m_l - m_l.detach()), scales


# ============================================================================ the step
def dpo_loss(trainee: PreferenceTrainee, micro: MicroStep, pairs: PreferencePairs, cfg: DpoConfig, *,
             steps: Sequence[int] | None = None, stream: str = "") -> StepLoss:  # fmt: skip
    """SCORE and LOSS of Diffusion-DPO / H-DPO on a micro-batch of pairs (``steps``: the allowed training steps)."""
    n = len(pairs.prompts)
    errors = denoising_errors(trainee, micro, pairs.prompts, torch.cat([pairs.winners, pairs.losers]),
                              num_timesteps=cfg.num_timesteps, sources=pairs.sources, steps=steps,
                              keep_outputs=cfg.winner_preserving, stream=stream)  # fmt: skip
    policy, reference = errors.policy, errors.reference
    m_l, extra = policy[n:], {}
    if cfg.winner_preserving:
        m_l, scales = winner_preserving_errors(errors, n)
        extra["loser_scale"] = float(scales.mean())
    out = diffusion_dpo_loss(policy[:n], m_l, reference[:n], reference[n:], beta=cfg.beta, alpha=cfg.alpha,
                             loss_type=cfg.loss_type, mask=pairs.keep.to(policy.device))  # fmt: skip
    metrics = {"implicit_accuracy": out.implicit_accuracy.detach(), "reward_margin": out.reward_margin.detach(),
               "policy_error_w": policy[:n].mean().detach(), "policy_error_l": policy[n:].mean().detach(),
               "timestep_index": float(errors.step), "noise_level": errors.noise_level, **extra, **pairs.metrics}  # fmt: skip
    return StepLoss(out.loss, metrics, rewards=pairs.scores)


def dpo_step(trainee: PreferenceTrainee, micro: MicroStep) -> StepLoss:
    """One micro-batch of Diffusion-DPO / H-DPO."""
    # ---------------------------------------------------------------- SAMPLE
    pairs = on_policy_pairs(trainee, micro) if trainee.cfg.data.source == "on_policy" else dataset_pairs(trainee, micro)
    # ---------------------------------------------------------------- SCORE + LOSS
    return dpo_loss(trainee, micro, pairs, trainee.cfg.dpo)


DPO = Method("dpo", DpoTrainingConfig, setup=setup, step=dpo_step, check=check_config)

__all__ = ["DPO", "Candidates", "DenoisingErrors", "DpoConfig", "DpoTrainingConfig", "PreferenceDataConfig",
           "PreferencePairs", "PreferenceTrainee", "add_frozen_reference", "best_and_worst", "check_preference_data", "dataset_pairs",
           "denoising_errors", "dpo_loss", "dpo_step", "drop_captions", "frozen_copy", "on_policy_candidates",
           "on_policy_pairs", "read_preference_pairs", "reference_denoiser", "setup_preference", "validation_prompts"]  # fmt: skip
