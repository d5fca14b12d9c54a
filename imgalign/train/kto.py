"""Diffusion-KTO: alignment from unpaired good/bad labels (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility").

KTO needs no pairs: every image is labelled desirable or undesirable on its own (a thumbs
up or down), which is what most user feedback looks like. The recipe::

    SAMPLE  labelled images: a labels file (prompt, image, label good/bad), a pairs file
            split into its winners (desirable) and losers (undesirable), as the paper does
            with Pick-a-Pic; or on-policy: K candidates per prompt from the current model,
            desirable when the labelling reward beats the prompt's candidate mean (or
            ``kto.threshold``) by more than ``kto.margin``, undesirable when it falls short
            by as much, otherwise unused
    SCORE   per-sample denoising errors of the policy and of the reference (the LoRA-disabled
            network, or the frozen copy under full fine-tuning), each image with its own noise
    LOSS    :func:`imgalign.losses.preference.diffusion_kto_loss`: the implicit reward
            ``g = r_err - m_err`` against a detached batch reference point ``max(0, mean g)``,
            ``lambda_y * (1 - sigmoid(sign * beta * (g - kl)))``

The reference point is the released script's (the batch mean of ``g``, detached). Under
several processes it is averaged across them first, so every process uses the same point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..losses.preference import diffusion_kto_loss
from .config import PipelineTrainingConfig
from .pipeline import check_pipeline, setup_pipeline
from .data import StepIndexedSampler
from .preference import (
    PreferenceDataConfig,
    add_frozen_reference,
    validation_prompts,
    PreferenceTrainee,
    check_preference_data,
    dataset_pairs,
    denoising_errors,
    on_policy_candidates,
    setup_preference,
)
from .registry import Method
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class KtoConfig:
    """Diffusion-KTO (Li et al. 2024; released script ``jacklishufan/diffusion-kto``)."""

    beta: float = 1000.0  # the released script's default
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0
    num_timesteps: int = 1000  # the schedule the training step is drawn from
    candidates: int = 4  # on-policy: images sampled per prompt
    threshold: float | None = None  # on-policy: desirable above this score (None: the prompt's candidate mean)
    margin: float = 0.0  # on-policy: images within this distance of the threshold are not used
    reference_offload: bool = False  # full fine-tuning: keep the frozen reference copy on the CPU between forwards


@dataclass
class KtoDataConfig(PreferenceDataConfig):
    """On-policy prompts, a pairs file (winners good, losers bad) or a labels file (prompt, image, good/bad)."""

    source: Literal["on_policy", "pairs", "labels"] = "on_policy"
    labels: str | None = None  # JSONL, Parquet or datasets directory: prompt, image, label (1/0, good/bad, true/false)


@dataclass
class KtoTrainingConfig(PipelineTrainingConfig):
    method: str = "kto"
    output_dir: str = "runs/kto"
    data: KtoDataConfig = field(default_factory=KtoDataConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)


def check_config(cfg: KtoTrainingConfig) -> None:
    check_pipeline(cfg)
    k = cfg.kto
    if k.beta <= 0 or not math.isfinite(k.beta):
        raise ValueError(f"kto.beta must be a positive number, got {k.beta}")
    if k.lambda_desirable <= 0 or k.lambda_undesirable <= 0:
        raise ValueError("kto.lambda_desirable and kto.lambda_undesirable must be positive")
    if k.num_timesteps < 1:
        raise ValueError("kto.num_timesteps must be >= 1")
    if cfg.data.source == "labels":
        check_labels_data(cfg)
        return
    check_preference_data(cfg, k.candidates, "kto")


def check_labels_data(cfg: PipelineTrainingConfig) -> None:
    """``data.source=labels``: a labels file, and a square training size to resize its images to."""
    if not cfg.data.labels:
        raise ValueError("data.source=labels needs data.labels=<JSONL, Parquet or datasets directory of labelled images>")
    if cfg.sampling.height is None or cfg.sampling.height != cfg.sampling.width:
        raise ValueError("a labels dataset is resized to a square: set sampling.height and sampling.width (equal)")


# ============================================================================ data
IMAGE_KEYS = ("image", "file_name", "path", "jpg", "image_path")
GOOD_KEYS = ("label", "desirable", "good", "thumbs_up")
_GOOD = {"1", "true", "good", "yes", "up", "desirable", "+1", "1.0"}
_BAD = {"0", "false", "bad", "no", "down", "undesirable", "-1", "0.0", "-1.0"}


@dataclass
class LabelledImage:
    prompt: str
    image: torch.Tensor  # [3, S, S]
    desirable: bool


def load_labelled_images(path: str, size: int, skip_bad_rows: bool = False) -> list[LabelledImage]:
    """Images with a good/bad label; bad rows are listed in one error (or skipped and reported)."""
    import warnings

    from rewards.data import base_dir, find_key, load_image_value, read_records
    from rewards.training import PROMPT_KEYS

    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no labelled images")
    key_image = find_key(records[0], None, IMAGE_KEYS, "image")
    key_label = find_key(records[0], None, GOOD_KEYS, "label")
    key_prompt = find_key(records[0], None, PROMPT_KEYS, "prompt", required=False)
    root = base_dir(path)
    items, bad = [], []
    for number, record in enumerate(records, 1):
        label = str(record.get(key_label)).strip().lower()
        if label not in _GOOD | _BAD:
            bad.append(f"row {number}: unknown label {record.get(key_label)!r} (use 1/0, good/bad or true/false)")
            continue
        try:
            image = load_image_value(record[key_image], root)
        except (KeyError, ValueError, OSError) as err:
            bad.append(f"row {number}: {type(err).__name__}: {err}")
            continue
        image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)[0]
        items.append(LabelledImage(str(record.get(key_prompt) or "") if key_prompt else "", image, label in _GOOD))
    if bad:
        listing = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        if not skip_bad_rows:
            raise ValueError(f"{path}: {len(bad)} bad rows of {len(records)} "
                             f"(set data.skip_bad_rows=true to train without them): {listing}")  # fmt: skip
        warnings.warn(f"{path}: skipped {len(bad)} bad rows of {len(records)}: {listing}", stacklevel=2)
    if not items:
        raise ValueError(f"{path}: no usable labelled images")
    return items


# ============================================================================ setup
@dataclass
class KtoTrainee(PreferenceTrainee):
    """The preference setup, plus a labels file's images."""

    labelled: list[LabelledImage] | None = None
    labelled_sampler: StepIndexedSampler | None = None


def setup(run: Run) -> KtoTrainee:
    cfg: KtoTrainingConfig = run.cfg
    if cfg.data.source != "labels":
        return setup_preference(run, reference_offload=cfg.kto.reference_offload, keep_ties=False, trainee_class=KtoTrainee)
    items = load_labelled_images(cfg.data.labels, cfg.sampling.height, cfg.data.skip_bad_rows)
    sampler = StepIndexedSampler(len(items), cfg.train.batch_size, run.num_processes, cfg.train.seed)
    trainee = setup_pipeline(run, needs_reward=bool(cfg.reward), data=validation_prompts(cfg, [item.prompt for item in items]),
                             trainee_class=KtoTrainee, labelled=items, labelled_sampler=sampler)  # fmt: skip
    if trainee.adapter.is_edit:
        raise ValueError("a labels file has no source images: train an edit model with data.source=on_policy or pairs")
    add_frozen_reference(trainee, offload=cfg.kto.reference_offload)
    return trainee


# ============================================================================ pieces of SAMPLE
@dataclass
class LabelledLatents:
    prompts: list[str]
    latents: torch.Tensor  # [N, C, h, w]
    desirable: torch.Tensor  # [N] bool
    sources: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def on_policy_labels(trainee: KtoTrainee, micro: MicroStep) -> LabelledLatents:
    """K candidates per prompt, desirable or undesirable against the threshold (those within the margin unused)."""
    k = trainee.cfg.kto
    cands = on_policy_candidates(trainee, micro, k.candidates)
    scores = cands.scores
    threshold = scores.mean(1, keepdim=True) if k.threshold is None else torch.full_like(scores[:, :1], k.threshold)
    good, bad = scores > threshold + k.margin, scores < threshold - k.margin
    used = (good | bad).flatten()
    idx = used.nonzero().flatten()
    prompts = [cands.prompts[i // k.candidates] for i in idx.tolist()]
    sources = None if cands.sources is None else cands.sources.repeat_interleave(k.candidates, 0)[idx]
    return LabelledLatents(prompts, cands.latents[idx.to(cands.latents.device)], good.flatten()[idx], sources,
                           scores=scores.flatten(), metrics={"used": float(used.float().mean()),
                                                             "desirable": float(good.float().mean())})  # fmt: skip


def pair_labels(trainee: KtoTrainee, micro: MicroStep) -> LabelledLatents:
    """A pairs file's winners as desirable and losers as undesirable."""
    pairs = dataset_pairs(trainee, micro)
    n = len(pairs.prompts)
    sources = None if pairs.sources is None else pairs.sources.repeat(2, 1, 1, 1)
    return LabelledLatents(pairs.prompts * 2, torch.cat([pairs.winners, pairs.losers]),
                           torch.arange(2 * n) < n, sources)  # fmt: skip


def file_labels(trainee: KtoTrainee, micro: MicroStep) -> LabelledLatents:
    chosen = [trainee.labelled[i] for i in trainee.labelled_sampler.indices(micro.index, micro.process_index)]
    images = torch.stack([item.image for item in chosen])
    with torch.no_grad():
        latents = trainee.adapter.encode_images(images, generator=micro.generators("vae", len(chosen)))
    return LabelledLatents([item.prompt for item in chosen], latents, torch.tensor([item.desirable for item in chosen]))


# ============================================================================ the step
def kto_step(trainee: KtoTrainee, micro: MicroStep) -> StepLoss:
    """One micro-batch of Diffusion-KTO."""
    cfg, k = trainee.cfg, trainee.cfg.kto
    # ---------------------------------------------------------------- SAMPLE
    source = {"on_policy": on_policy_labels, "pairs": pair_labels, "labels": file_labels}[cfg.data.source]
    batch = source(trainee, micro)
    if not batch.prompts:  # every candidate within the margin: nothing to learn from
        mean_over_processes(torch.zeros(0, device=trainee.adapter.device))  # the other processes still average their reference points with ours
        zero = sum(p.sum() for p in trainee.trainable.values()) * 0.0
        return StepLoss(zero, {"used": 0.0}, rewards=batch.scores)
    # ---------------------------------------------------------------- SCORE
    errors = denoising_errors(trainee, micro, batch.prompts, batch.latents, num_timesteps=k.num_timesteps,
                              sources=batch.sources)  # fmt: skip
    # ---------------------------------------------------------------- LOSS
    g = (errors.reference - errors.policy).detach()
    kl = mean_over_processes(g).clamp(min=0)
    out = diffusion_kto_loss(errors.policy, errors.reference, batch.desirable.to(errors.policy.device), beta=k.beta,
                             kl=kl, lambda_d=k.lambda_desirable, lambda_u=k.lambda_undesirable)  # fmt: skip
    metrics = {"implicit_accuracy": out.implicit_accuracy.detach(), "reward_margin": out.reward_margin.detach(),
               "kl_reference_point": float(kl), "timestep_index": float(errors.step), **batch.metrics}  # fmt: skip
    return StepLoss(out.loss, metrics, rewards=batch.scores)


def mean_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process's batch (the KTO reference point all processes share)."""
    from accelerate.state import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return values.mean()
    import torch.distributed as dist

    total = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
    dist.all_reduce(total)
    return total[0] / total[1].clamp(min=1.0)


KTO = Method("kto", KtoTrainingConfig, setup=setup, step=kto_step, check=check_config)

__all__ = ["KTO", "KtoConfig", "KtoDataConfig", "KtoTrainee", "KtoTrainingConfig", "LabelledImage", "check_labels_data",
           "kto_step", "load_labelled_images"]  # fmt: skip
