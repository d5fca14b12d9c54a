"""DiffusionNFT: online RL on the forward process, from clean samples and their rewards.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"
(arXiv:2509.16117, ICLR 2026). Transcribed from the paper and from the authors' code,
``NVlabs/DiffusionNFT``: ``scripts/train_nft_sd3.py`` (the loop: rollouts from the "old"
LoRA adapter, per-prompt advantages, the loss, the soft update of the old adapter),
``flow_grpo/stat_tracking.py`` (advantages), and the defaults of ``config/base.py`` and
``config/nft.py``. The loss itself is :func:`imgalign.losses.nft.nft_loss`.

Unlike GRPO, nothing here needs the sampler's likelihood: the old policy samples with any
solver (here the pipeline's own ODE scheduler), and training only sees the clean samples,
noised again on the forward process. One rollout, then its updates::

    OLD     at the start of every rollout but the first, the old (sampling) policy moves
            towards the current weights: old <- eta * old + (1 - eta) * theta with
            eta = min(nft.old_decay_rate * (step - nft.old_decay_start), nft.old_decay_max)
            (0 before old_decay_start; step = optimizer steps done). Their decay_type 1
            (0, 0.001, 0.5) is the default; decay_type 2 is (75, 0.0075, 0.999), and
            rate 0 keeps old = theta (fully on-policy)
    SAMPLE  train.batch_size prompts x nft.group_size images per process from the *old*
            policy, without classifier-free guidance when nft.cfg_free (their
            sample.guidance_scale = 1: the model is trained and evaluated CFG-free)
    SCORE   the reward of every image; advantages A = (R - mean of the prompt's group) /
            (std + 1e-4), the std over the whole rollout of every process
            (nft.global_std, their default) or per group; r = 1/2 + 1/2 clip(A / 5, -1, 1)
    LOSS    nft.train_batch_size images at a time, each chunk at T = int(sampling.num_steps *
            nft.timestep_fraction) times of the sampling schedule (one micro-step per chunk
            and time, all of one update in one optimizer step, as their gradient
            accumulation over batches x timesteps): x_t = (1 - t) x0 + t eps with fresh eps,
            the old velocity (no gradient), the current one, the NFT loss with their
            adaptive weighting, plus nft.kl_weight * ||v_theta - v_ref||^2 against the base
            model (the LoRA-disabled network, or a frozen copy under full fine-tuning)

One optimizer step is one update, so NFT sets ``train.gradient_accumulation_steps`` itself
(chunks x times); ``nft.updates_per_rollout = U`` splits a rollout into U updates (their
``gradient_step_per_epoch``: 2 for the OCR run). Only flow-matching models train (SD3/3.5,
FLUX, Shapes): the loss is written for the velocity of ``x_t = (1 - t) x0 + t eps``.

**The old policy.** Their code keeps it as a second LoRA adapter ("old") and switches
adapters for the rollout and the old velocity. We keep the same numbers as a copy of the
trainable tensors and swap the parameters' storages in for those forwards
(:func:`old_policy`): no adapter switching, and it works for full fine-tuning too. The copy
is saved in every checkpoint (:meth:`NftTrainee.state_tensors`), so a resumed run samples
from the same old policy as the uninterrupted one.

Our assumptions where the code does not carry over one to one: the times a chunk trains at
are a random subset of the sampling schedule's, shared by the chunk's images (their script
draws a permutation per image; our adapters take one time per forward); a prompt's group
is sampled on one process (their sampler spreads it over GPUs; the advantages are the same
numbers); ``nft.cfg_free = false`` (rollouts and validation with ``sampling.guidance_scale``,
the loss on the conditional velocity) is an extension of ours: their training loop has no
guided branch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipelines import Conditioning

from ..losses.nft import ADVANTAGE_MODES, nft_loss, optimality_probability
from .config import PipelineTrainingConfig
from .data import Batch
from .forward_process import noise_to_step, target_at_step
from .loop import randn_like_per_image, step_generators, step_rng
from .pipeline import check_pipeline, sample_images, score, setup_pipeline
from .preference import PreferenceTrainee, add_frozen_reference, reference_denoiser
from .registry import Method
from .rollouts import RolloutLayout, rollout_advantages, rollout_layout
from .run import MicroStep, Run, StepLoss


# ============================================================================ config
@dataclass
class NftConfig:
    """DiffusionNFT (defaults: the released ``config/base.py`` + ``config/nft.py`` for SD3.5)."""

    beta: float = 1.0  # config.beta: v+ = beta v_theta + (1 - beta) v_old (0.1 for their OCR / multi-reward runs)
    group_size: int = 24  # sample.num_image_per_prompt
    advantage_clip: float = 5.0  # train.adv_clip_max: r = 1/2 + 1/2 clip(A / 5, -1, 1); also the loss scale
    advantage_mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = "all"  # train.adv_mode
    global_std: bool = True  # sample.global_std: the advantages' std over the whole rollout (else per group)
    timestep_fraction: float = 0.99  # train.timestep_fraction: T = int(sampling.num_steps * fraction) times per chunk
    adaptive_weighting: bool = True  # the script's self-normalised x0 regression (False: plain velocity MSE)
    kl_weight: float = 1e-4  # train.beta: weight of ||v_theta - v_ref||^2 (0: no reference forward)
    cfg_free: bool = True  # sample.guidance_scale = 1: rollouts and validation without CFG
    old_decay_start: int = 0  # decay_type 1 ("flat")
    old_decay_rate: float = 0.001  # decay_type 1 ("uprate")
    old_decay_max: float = 0.5  # decay_type 1 ("uphold")
    train_batch_size: int | None = None  # images per micro-step (their train.batch_size, 9 per GPU); None: group_size
    updates_per_rollout: int = 1  # optimizer steps per rollout (their gradient_step_per_epoch)
    reference_offload: bool = False  # full fine-tuning: keep the frozen reference copy on the CPU between forwards


@dataclass
class NftTrainingConfig(PipelineTrainingConfig):
    method: str = "nft"
    output_dir: str = "runs/nft"
    nft: NftConfig = field(default_factory=NftConfig)


def times_per_chunk(cfg: NftTrainingConfig) -> int:
    """T: how many times of the sampling schedule each chunk of a rollout trains at."""
    return max(1, int(cfg.sampling.num_steps * cfg.nft.timestep_fraction))


def layout(cfg: NftTrainingConfig) -> RolloutLayout:
    """Chunks of ``nft.train_batch_size`` images x T times; sets the gradient accumulation."""
    n = cfg.nft
    return rollout_layout(cfg, "nft", group_size=n.group_size, train_batch_size=n.train_batch_size,
                          updates_per_rollout=n.updates_per_rollout, per_chunk=times_per_chunk(cfg))


def check_config(cfg: NftTrainingConfig) -> None:
    """Knowable before loading: a reward, positive sizes and rates, and the micro-step count."""
    check_pipeline(cfg)
    n = cfg.nft
    if not cfg.reward:
        raise ValueError("DiffusionNFT optimises a reward: set reward=<name> (any reward, e.g. shapes-oracle or pickscore)")
    if n.group_size < 2:
        raise ValueError(f"nft.group_size must be >= 2 (advantages compare the images of a prompt), got {n.group_size}")
    for key in ("beta", "advantage_clip"):
        value = getattr(n, key)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"nft.{key} must be a positive number, got {value}")
    if n.advantage_mode not in ADVANTAGE_MODES:
        raise ValueError(f"nft.advantage_mode must be one of {', '.join(ADVANTAGE_MODES)}, got {n.advantage_mode!r}")
    if not (math.isfinite(n.kl_weight) and n.kl_weight >= 0):
        raise ValueError(f"nft.kl_weight must be >= 0, got {n.kl_weight}")
    if not 0 < n.timestep_fraction <= 1:
        raise ValueError(f"nft.timestep_fraction must be in (0, 1], got {n.timestep_fraction}")
    if cfg.sampling.num_steps < 1:
        raise ValueError(f"sampling.num_steps must be >= 1, got {cfg.sampling.num_steps}")
    if n.old_decay_start < 0 or not (math.isfinite(n.old_decay_rate) and n.old_decay_rate >= 0):
        raise ValueError(f"nft.old_decay_start and nft.old_decay_rate must be >= 0, got {n.old_decay_start}, "
                         f"{n.old_decay_rate}")  # fmt: skip
    if not 0 <= n.old_decay_max <= 1:
        raise ValueError(f"nft.old_decay_max must be in [0, 1], got {n.old_decay_max}")
    layout(cfg)


# ============================================================================ setup
@dataclass
class NftRollout:
    """One rollout of this process: clean samples of the old policy, their rewards and training times."""

    index: int  # rollout counter (optimizer step // updates_per_rollout): prompts and noise derive from it
    prompts: list[str]  # [n], one per image, prompt-major (group_size per prompt)
    sources: torch.Tensor | None  # [n, 3, H, W] edit sources
    latents: torch.Tensor  # [n, C, h, w] clean latents, on the CPU
    scores: torch.Tensor  # [n]
    r: torch.Tensor  # [n] optimality probabilities
    times: list[list[int]]  # per chunk: the schedule indices it trains at, in order
    metrics: dict[str, float] = field(default_factory=dict)
    encoded: tuple[int, Conditioning] | None = None  # the chunk being trained and its prompts' conditioning (T micro-steps)


@dataclass
class NftTrainee(PreferenceTrainee):
    run: Run | None = None
    old: dict[str, torch.Tensor] | None = None  # the old policy: a copy of the trainable tensors, by name
    old_rollout: int = -1  # the rollout whose start last updated ``old``
    rollout: NftRollout | None = None

    def encode(self, prompts: list[str], source: torch.Tensor | None, *, guidance: bool = True) -> Conditioning:
        """CFG-free training samples and validates without guidance (their ``sample.guidance_scale = 1``)."""
        return super().encode(prompts, source, guidance=guidance and not self.cfg.nft.cfg_free)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The old policy's weights (always) and the rollout buffer (when several updates share a rollout)."""
        if self.old is None:
            return {}
        state = {f"old.{name}": value for name, value in self.old.items()}
        state["old_rollout"] = torch.tensor(self.old_rollout)
        r = self.rollout
        if r is not None and self.cfg.nft.updates_per_rollout > 1:
            state.update({"rollout.index": torch.tensor(r.index), "rollout.latents": r.latents,
                          "rollout.scores": r.scores, "rollout.r": r.r, "rollout.times": torch.tensor(r.times),
                          **{f"rollout.metrics.{k}": torch.tensor(v) for k, v in r.metrics.items()}})  # fmt: skip
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "old_rollout" not in tensors:
            return
        missing = [name for name in self.trainable if f"old.{name}" not in tensors]
        if missing:
            raise ValueError(f"the checkpoint's old policy does not match the run's trainable weights "
                             f"(missing {missing[:3]})")  # fmt: skip
        self.old = {name: tensors[f"old.{name}"].to(p.device, p.dtype).clone() for name, p in self.trainable.items()}
        self.old_rollout = int(tensors["old_rollout"])
        if "rollout.index" in tensors:
            index, G = int(tensors["rollout.index"]), self.cfg.nft.group_size
            batch = self.data.batch(index, self.run.process_index if self.run else 0)
            self.rollout = NftRollout(index, [p for p in batch.prompts for _ in range(G)],
                                      None if batch.images is None else batch.images.repeat_interleave(G, 0),
                                      tensors["rollout.latents"], tensors["rollout.scores"], tensors["rollout.r"],
                                      tensors["rollout.times"].tolist())  # fmt: skip
            prefix = "rollout.metrics."
            self.rollout.metrics = {k[len(prefix) :]: float(v) for k, v in tensors.items() if k.startswith(prefix)}


def setup(run: Run) -> NftTrainee:
    cfg: NftTrainingConfig = run.cfg
    trainee = setup_pipeline(run, needs_reward=True, trainee_class=NftTrainee)
    trainee.run, adapter = run, trainee.adapter
    if not adapter.is_flow:
        raise ValueError(f"nft trains flow-matching models (SD3/3.5, FLUX, shapes); {adapter.family} is an "
                         f"{adapter.prediction_type} model: use grpo, rwr mode=awm or dpo for it")  # fmt: skip
    if cfg.nft.kl_weight > 0:
        add_frozen_reference(trainee, offload=cfg.nft.reference_offload)
    return trainee


# ============================================================================ the old policy
@contextlib.contextmanager
def old_policy(trainee: NftTrainee) -> Iterator[None]:
    """Run the old (sampling) policy: its tensors swapped into the trainable parameters, then back.

    Swapping storages (``p.data``) copies nothing. Run it only where no autograd graph of the
    current weights is alive (rollouts, and the old velocity *before* the current forward).
    """
    _swap_old(trainee)
    try:
        yield
    finally:
        _swap_old(trainee)


def _swap_old(trainee: NftTrainee) -> None:
    with torch.no_grad():
        for name, p in trainee.trainable.items():
            current = p.data
            p.data = trainee.old[name]
            trainee.old[name] = current


def old_policy_decay(step: int, cfg: NftConfig) -> float:
    """eta after ``step`` optimizer steps: 0 before ``old_decay_start``, then ``old_decay_rate`` more per step, capped.

    Their ``return_decay(step, decay_type)`` with (flat, uprate, uphold) = (start, rate, max).
    """
    if step < cfg.old_decay_start:
        return 0.0
    return min((step - cfg.old_decay_start) * cfg.old_decay_rate, cfg.old_decay_max)


def update_old_policy(trainee: NftTrainee, index: int) -> float:
    """Before rollout ``index``: old = copy of theta (the first), else old <- eta old + (1 - eta) theta; returns eta."""
    nft = trainee.cfg.nft
    if trainee.old is None:
        if index > 0:
            raise RuntimeError(f"rollout {index} samples from the old policy, which the checkpoint this run resumed "
                               "from does not hold (saved by another method?)")  # fmt: skip
        trainee.old = {name: p.detach().clone() for name, p in trainee.trainable.items()}
        trainee.old_rollout = 0
        return 0.0
    if trainee.old_rollout >= index:  # already updated for this rollout
        return old_policy_decay(index * nft.updates_per_rollout, nft)
    eta = old_policy_decay(index * nft.updates_per_rollout, nft)
    with torch.no_grad():
        for name, p in trainee.trainable.items():
            trainee.old[name].mul_(eta).add_(p.detach(), alpha=1.0 - eta)
    trainee.old_rollout = index
    return eta


# ============================================================================ SAMPLE + SCORE
def rollout(trainee: NftTrainee, index: int, process_index: int) -> NftRollout:
    """``train.batch_size`` prompts x ``group_size`` images from the old policy, scored, with their r and training times."""
    cfg, nft, seed = trainee.cfg, trainee.cfg.nft, trainee.cfg.train.seed
    batch = trainee.data.batch(index, process_index)
    G = nft.group_size
    prompts = [p for p in batch.prompts for _ in range(G)]
    sources = None if batch.images is None else batch.images.repeat_interleave(G, 0)
    n, chunk = len(prompts), nft.train_batch_size or G
    noise = step_generators(seed, index, process_index, "nft-rollout", n)
    step_noise = step_generators(seed, index, process_index, "nft-rollout-steps", n)
    latents, scores = [], []
    with old_policy(trainee):
        for start in range(0, n, chunk):  # in training chunks: bounded memory for large groups
            rows = slice(start, start + chunk)
            src = None if sources is None else sources[rows]
            x, images = sample_images(trainee, Batch(prompts[rows], src), noise[rows], step_noise[rows])
            with torch.no_grad():
                scores.append(score(trainee.reward, images, prompts[rows], src).float().cpu())
            latents.append(x.detach().cpu())
    values = torch.cat(scores)
    advantages = rollout_advantages(values.view(-1, G), trainee.run, clip=None,  # optimality_probability clips
                                    std="global" if trainee.cfg.nft.global_std else "group").flatten()
    r = optimality_probability(advantages, nft.advantage_clip, nft.advantage_mode)
    rng = step_rng(seed, index, process_index, "nft-times")
    times = [rng.sample(range(cfg.sampling.num_steps), times_per_chunk(cfg)) for _ in range(n // chunk)]
    out = NftRollout(index, prompts, sources, torch.cat(latents), values, r, times)
    out.metrics = rollout_metrics(trainee, values, advantages)
    return out


def rollout_metrics(trainee: NftTrainee, scores: torch.Tensor, advantages: torch.Tensor) -> dict[str, float]:
    """What every micro-step of a rollout logs about it (the skeleton averages metrics over micro-steps)."""
    groups = scores.view(-1, trainee.cfg.nft.group_size)
    return {"zero_spread_groups": float((groups.std(1) == 0).float().mean()),
            "group_reward_std": float(groups.std(1, unbiased=False).mean()),
            "advantage_abs": float(advantages.abs().mean())}  # fmt: skip


# ============================================================================ the step
def nft_step(trainee: NftTrainee, micro: MicroStep) -> StepLoss:
    """One micro-step: one chunk of the rollout at one time (first, at a rollout's start: update the old policy, roll out)."""
    cfg, adapter, nft = trainee.cfg, trainee.adapter, trainee.cfg.nft
    U = nft.updates_per_rollout
    index = micro.step // U
    m = micro.index - micro.step * cfg.train.gradient_accumulation_steps  # position inside this optimizer step
    rewards = None
    # ---------------------------------------------------------------- OLD + SAMPLE + SCORE (once per rollout)
    if trainee.rollout is None or trainee.rollout.index != index:
        if micro.step % U or m:
            raise RuntimeError(f"step {micro.step} trains on rollout {index}, which is not in memory (resumed from a "
                               "checkpoint without it)")  # fmt: skip
        eta = update_old_policy(trainee, index)
        trainee.rollout = rollout(trainee, index, micro.process_index)
        trainee.rollout.metrics["old_decay"] = eta
        rewards = trainee.rollout.scores
    ro = trainee.rollout
    # ---------------------------------------------------------------- which chunk, which time: the forward process
    c, k, rows = layout(cfg).locate(micro.step % U, m)
    i = ro.times[c][k]
    sched = adapter.schedule(cfg.sampling.num_steps, height=trainee.height, width=trainee.width)
    x0 = ro.latents[rows].to(adapter.device)
    eps = randn_like_per_image(x0, micro.generators("nft-noise", len(x0))).to(x0.dtype)
    x_t = noise_to_step(adapter, sched, i, x0, eps)
    target = target_at_step(adapter, sched, i, x0, eps)  # the velocity eps - x0
    if ro.encoded is None or ro.encoded[0] != c:  # a chunk's T micro-steps are consecutive: encode it once
        cond = trainee.encode(ro.prompts[rows], None if ro.sources is None else ro.sources[rows], guidance=False)
        ro.encoded = (c, Conditioning(cond=cond.cond, uncond=None, guidance_scale=1.0, extra=cond.extra))
    cond = ro.encoded[1]
    # ---------------------------------------------------------------- SCORE: the old, reference and policy velocities
    with torch.no_grad():
        with old_policy(trainee):  # before the current forward: no graph is alive while the storages are swapped
            v_old = adapter.predict(x_t, sched, i, cond)
        v_ref = None
        if nft.kl_weight > 0:
            with reference_denoiser(trainee):
                v_ref = adapter.predict(x_t, sched, i, cond)
    v = adapter.predict(x_t, sched, i, cond)
    # ---------------------------------------------------------------- LOSS
    r = ro.r[rows].to(v.device)
    out = nft_loss(v, v_old, target, sched.sigmas[i], r, beta=nft.beta, scale=nft.advantage_clip,
                   adaptive_weighting=nft.adaptive_weighting)  # fmt: skip
    loss = out.loss
    metrics = {**ro.metrics, "policy_loss": float(out.loss.detach()), "unweighted_policy_loss": float(out.unweighted),
               "positive_loss": float(out.positive.mean()), "negative_loss": float(out.negative.mean()),
               "old_deviation": float(out.old_deviation), "r_mean": float(r.mean()), "timestep_index": float(i),
               "noise_level": adapter.noise_level(sched, i),
               "nfe_total": float(function_evaluations(cfg, micro.step + 1))}  # fmt: skip
    if v_ref is not None:
        kl = (v.float() - v_ref.float()).pow(2).mean()
        loss = loss + nft.kl_weight * kl
        metrics["kl"] = float(kl.detach())
        metrics["old_kl"] = float((v_old.float() - v_ref.float()).pow(2).mean())
    return StepLoss(loss, metrics, rewards=rewards)


def function_evaluations(cfg: NftTrainingConfig, steps: int) -> int:
    """Denoiser evaluations per process after ``steps`` optimizer steps, counted as GRPO's are.

    One evaluation is one image through the denoiser at one step (a CFG pair counts once): the
    rollout's ODE samples, then per trained image and time the old velocity, the policy's
    forward + backward and (``nft.kl_weight > 0``) the reference's.
    """
    n = cfg.nft
    images = cfg.train.batch_size * n.group_size
    rollouts = (steps - 1) // n.updates_per_rollout + 1
    per_update = images // n.updates_per_rollout * times_per_chunk(cfg) * (3 if n.kl_weight > 0 else 2)
    return rollouts * images * cfg.sampling.num_steps + steps * per_update


NFT = Method("nft", NftTrainingConfig, setup=setup, step=nft_step, check=check_config,
             help="DiffusionNFT (Zheng et al. 2025): positive/negative flow matching on old-policy samples, any solver")

__all__ = ["NFT", "NftConfig", "NftRollout", "NftTrainee", "NftTrainingConfig", "check_config", "function_evaluations",
           "nft_step", "old_policy", "old_policy_decay", "rollout", "setup", "times_per_chunk",
           "update_old_policy"]  # fmt: skip
