"""Online RL on the sampling chain: GRPO (Flow-GRPO SDE / CPS, DDPO's DDIM-eta) and Smart-GRPO.

The sampling chain of a diffusion or flow model is a sequence of Gaussian transitions, so
any reward of the final image, differentiable or not (a detector, the Shapes oracle, a VLM,
PickScore), is optimised by a policy gradient over the transitions (Black et al. 2023,
"Training Diffusion Models with Reinforcement Learning", DDPO; Liu et al. 2025, "Flow-GRPO:
Training Flow Matching Models via Online RL", arXiv:2505.05470). One rollout, then updates::

    SAMPLE  train.batch_size prompts x grpo.group_size images per process, through the
            adapter's stochastic step with its exact log-probability (grpo.step_type: "sde"
            or "cps" for flow models, "ddim" = DDPO for epsilon/v models); stochastic only
            inside grpo.window steps (Flow-GRPO-Fast / MixGRPO), deterministic ODE elsewhere
    SCORE   the reward of every image; advantages (r - mean_group) / (std + 1e-4), per group
            or with the global std, clipped to grpo.advantage_clip; groups without spread
            contribute nothing
    UPDATE  for every trained step of the window: PPO-clip over the stored log-probs
            (grpo.clip_range), plus grpo.beta * KL(step || reference step) on the step means
            scaled by the step variance; the reference is the LoRA-disabled network (or a
            frozen copy under full fine-tuning)

One optimizer step is one update: its micro-steps are (rollout chunks of the update) x
(trained steps), so GRPO sets ``train.gradient_accumulation_steps`` itself. With
``grpo.updates_per_rollout = U`` a rollout is split into U updates (Flow-GRPO's two
optimizer steps per epoch): the first is exactly on-policy (ratio 1), the later ones are
not, and there PPO's clip matters. The rollout buffer is saved in checkpoints, so a run
resumed between updates continues exactly.

Why the ratio is exactly 1 on the first update (Flow-GRPO's users hit both failures): the
log-probs are computed in float32 from the same forward the training pass repeats, with the
same batch layout (a rollout runs in chunks of ``grpo.train_batch_size`` images, the chunks
the update trains on) and under the same autocast; dropout must be off (LoRA has none here).

**Smart-GRPO** (Yu et al. 2025, arXiv:2510.02654; no public code): before every rollout the
initial noise of each prompt is refined by a search over N(mu, diag(sigma^2)) scored with
one-step decodes (:func:`imgalign.sampling.search_noise`); the rollouts then start from the
refined distribution. The per-step SDE noise is not searched: the policy gradient needs the
transitions to follow the policy's own Gaussians. Function evaluations spent on search,
rollouts and updates are logged (``nfe_*``) so that methods are compared at equal compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

import pipelines

from ..losses.policy_gradient import ppo_clip_loss, step_mean_kl
from .config import PipelineTrainingConfig
from .loop import step_generators, step_rng
from .pipeline import check_pipeline, score, setup_pipeline
from .preference import PreferenceTrainee, add_frozen_reference, reference_denoiser
from .registry import Method
from .rollouts import RolloutLayout, rollout_advantages, rollout_layout
from .run import MicroStep, Run, StepLoss

DEFAULT_NOISE_LEVEL = {"sde": 0.7, "cps": 0.8, "ddim": 1.0}  # Flow-GRPO's a (SDE 0.7, CPS 0.8); DDPO's eta 1


# ============================================================================ config
@dataclass
class GrpoConfig:
    """GRPO over the sampling chain (defaults: Flow-GRPO's published SD3.5 settings where they apply)."""

    group_size: int = 8  # images per prompt (Flow-GRPO: 24 on SD3.5)
    step_type: Literal["auto", "sde", "cps", "ddim"] = "auto"  # auto: sde for flow models, ddim (DDPO) otherwise
    noise_level: float | None = None  # SDE a / CPS a / DDIM eta; None: 0.7 / 0.8 / 1.0
    window: int = 0  # stochastic (and trained) steps per rollout; 0: all steps
    window_range: list[int] | None = None  # [first, last] steps the window may start at (random per rollout); default [0, 0]
    timestep_fraction: float = 1.0  # fraction of the window's steps trained per rollout (DanceGRPO: 0.6)
    clip_range: float = 1e-4  # PPO clip (Flow-GRPO: 1e-4)
    advantage_clip: float = 5.0
    advantage_std: Literal["group", "global"] = "group"
    beta: float = 0.04  # KL weight (Flow-GRPO: 0.04 for rule-based rewards, 0.01 for PickScore)
    train_batch_size: int | None = None  # images per rollout chunk and training micro-batch; None: group_size
    updates_per_rollout: int = 1  # optimizer steps that share one rollout
    reference_offload: bool = False  # full fine-tuning: keep the frozen reference copy on the CPU between forwards


@dataclass
class NoiseSearchConfig:
    """Smart-GRPO's search over the initial noise (our assumptions for the paper's unstated choices)."""

    rounds: int = 3  # N
    candidates: int = 8  # K per prompt and round
    keep: int = 2  # T: the top T refit the Gaussian
    smoothing: float = 0.5  # mu <- s * mu + (1 - s) * mean(top T); the same for sigma
    std_floor: float = 0.5  # sigma never falls below this (no collapse onto one noise)


@dataclass
class GrpoTrainingConfig(PipelineTrainingConfig):
    method: str = "grpo"
    output_dir: str = "runs/grpo"
    grpo: GrpoConfig = field(default_factory=GrpoConfig)


@dataclass
class SmartGrpoTrainingConfig(GrpoTrainingConfig):
    method: str = "smart-grpo"
    output_dir: str = "runs/smart-grpo"
    search: NoiseSearchConfig = field(default_factory=NoiseSearchConfig)


def trained_steps_per_rollout(cfg: GrpoTrainingConfig) -> int:
    g = cfg.grpo
    window = g.window or cfg.sampling.num_steps
    return max(1, round(g.timestep_fraction * window))


def layout(cfg: GrpoTrainingConfig) -> RolloutLayout:
    """Chunks of ``grpo.train_batch_size`` images x the trained steps; sets the gradient accumulation."""
    g = cfg.grpo
    return rollout_layout(cfg, "grpo", group_size=g.group_size, train_batch_size=g.train_batch_size,
                          updates_per_rollout=g.updates_per_rollout, per_chunk=trained_steps_per_rollout(cfg))


def check_config(cfg: GrpoTrainingConfig) -> None:
    """Knowable before loading: positive sizes, a window inside the schedule, and the micro-step count."""
    check_pipeline(cfg)
    g, steps = cfg.grpo, cfg.sampling.num_steps
    if not cfg.reward:
        raise ValueError("GRPO optimises a reward: set reward=<name> (any reward, e.g. shapes-oracle or pickscore)")
    if g.group_size < 2:
        raise ValueError(f"grpo.group_size must be >= 2 (advantages compare the images of a prompt), got {g.group_size}")
    if steps < 1:
        raise ValueError(f"sampling.num_steps must be >= 1, got {steps}")
    if not 0 <= g.window <= steps:
        raise ValueError(f"grpo.window must be in [0, sampling.num_steps={steps}], got {g.window}")
    lo, hi = g.window_range or [0, 0]
    if g.window_range is not None and (len(g.window_range) != 2 or not 0 <= lo <= hi <= steps - max(g.window, 1)):
        raise ValueError(f"grpo.window_range must be [first, last] start steps with last <= {steps - max(g.window, 1)}, "
                         f"got {g.window_range}")  # fmt: skip
    if not 0 < g.timestep_fraction <= 1:
        raise ValueError(f"grpo.timestep_fraction must be in (0, 1], got {g.timestep_fraction}")
    for key in ("clip_range", "advantage_clip"):
        value = getattr(g, key)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"grpo.{key} must be a positive number, got {value}")
    if not (math.isfinite(g.beta) and g.beta >= 0):
        raise ValueError(f"grpo.beta must be >= 0, got {g.beta}")
    if g.noise_level is not None and not (math.isfinite(g.noise_level) and g.noise_level > 0):
        raise ValueError(f"grpo.noise_level must be a positive number, got {g.noise_level}")
    layout(cfg)
    if isinstance(cfg, SmartGrpoTrainingConfig):
        s = cfg.search
        if s.rounds < 1 or s.candidates < 2 or not 1 <= s.keep <= s.candidates:
            raise ValueError(f"search needs rounds >= 1, candidates >= 2 and 1 <= keep <= candidates, got "
                             f"rounds={s.rounds}, candidates={s.candidates}, keep={s.keep}")  # fmt: skip
        if not 0 <= s.smoothing < 1 or not s.std_floor >= 0:
            raise ValueError(f"search.smoothing must be in [0, 1) and search.std_floor >= 0, got {s.smoothing}, "
                             f"{s.std_floor}")  # fmt: skip


# ============================================================================ setup
@dataclass
class Rollout:
    """One rollout of this process: trajectories, stored log-probs and advantages (prompt-major, G per prompt)."""

    step: int  # the optimizer step it was drawn at
    prompts: list[str]  # [n]
    sources: torch.Tensor | None  # [n, 3, H, W] edit sources
    latents: torch.Tensor  # [n, T + 1, C, h, w]: x_T ... x_0 (only the trained steps' pairs are needed)
    log_probs: torch.Tensor  # [n, T] float32 (0 outside the window)
    scores: torch.Tensor  # [n]
    advantages: torch.Tensor  # [n]
    trained: list[int]  # the step indices the updates train, in order
    metrics: dict[str, float] = field(default_factory=dict)  # what the rollout cost and saw, logged with its updates
    encoded: tuple[int, pipelines.Conditioning] | None = None  # the chunk being trained and its prompts' conditioning


@dataclass
class GrpoTrainee(PreferenceTrainee):
    context: Run | None = None  # the run (processes, for the global advantage std)
    rollout: Rollout | None = None
    step_type: str = "sde"
    noise_level: float = 0.7

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The rollout buffer, which the later updates of a rollout train on (``updates_per_rollout > 1``)."""
        r = self.rollout
        if r is None or self.cfg.grpo.updates_per_rollout == 1:
            return {}
        return {"rollout.step": torch.tensor(r.step), "rollout.latents": r.latents, "rollout.log_probs": r.log_probs,
                "rollout.scores": r.scores, "rollout.advantages": r.advantages,
                "rollout.trained": torch.tensor(r.trained),
                **{f"rollout.metrics.{k}": torch.tensor(v) for k, v in r.metrics.items()}}  # fmt: skip

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "rollout.step" not in tensors:
            return
        cfg, step = self.cfg, int(tensors["rollout.step"])
        batch = self.data.batch(step // cfg.grpo.updates_per_rollout, self.context.process_index if self.context else 0)
        G = cfg.grpo.group_size
        self.rollout = Rollout(step, [p for p in batch.prompts for _ in range(G)],
                               None if batch.images is None else batch.images.repeat_interleave(G, 0),
                               tensors["rollout.latents"], tensors["rollout.log_probs"], tensors["rollout.scores"],
                               tensors["rollout.advantages"], tensors["rollout.trained"].tolist(),
                               {k.split(".", 2)[2]: float(v) for k, v in tensors.items() if k.startswith("rollout.metrics.")})  # fmt: skip


def setup(run: Run) -> GrpoTrainee:
    cfg: GrpoTrainingConfig = run.cfg
    trainee = setup_pipeline(run, needs_reward=True, trainee_class=GrpoTrainee, context=run)
    adapter, g = trainee.adapter, cfg.grpo
    step_type = g.step_type if g.step_type != "auto" else ("sde" if adapter.is_flow else "ddim")
    if adapter.is_flow != (step_type in ("sde", "cps")):
        kind = "a flow" if adapter.is_flow else f"an {adapter.prediction_type}"
        raise ValueError(f"grpo.step_type={step_type} does not fit {adapter.family} ({kind} model): use "
                         f"{'sde or cps' if adapter.is_flow else 'ddim'}")  # fmt: skip
    trainee.step_type = step_type
    trainee.noise_level = DEFAULT_NOISE_LEVEL[step_type] if g.noise_level is None else g.noise_level
    if g.beta > 0:
        add_frozen_reference(trainee, offload=g.reference_offload)
    return trainee


# ============================================================================ SAMPLE
def rollout_window(cfg: GrpoTrainingConfig, rng) -> tuple[list[int], list[int]]:
    """(stochastic steps, trained steps): the window (random start within window_range) and a random subset of it."""
    g, steps = cfg.grpo, cfg.sampling.num_steps
    if not g.window:
        window = list(range(steps))
    else:
        lo, hi = g.window_range or [0, 0]
        start = rng.randint(lo, hi)
        window = list(range(start, start + g.window))
    k = trained_steps_per_rollout(cfg)
    trained = sorted(rng.sample(window, k)) if k < len(window) else window
    return window, trained


def initial_noise(trainee: GrpoTrainee, prompts: list[str], sources: torch.Tensor | None, rollout_index: int,
                  process_index: int) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The rollout's starting latents: N(0, I) for GRPO, the searched N(mu, sigma^2) for Smart-GRPO."""
    cfg, adapter = trainee.cfg, trainee.adapter
    n = len(prompts)
    generators = step_generators(cfg.train.seed, rollout_index, process_index, "grpo-init", n)
    noise = adapter.prepare_latents(n, trainee.height, trainee.width, generator=generators)
    if not isinstance(cfg, SmartGrpoTrainingConfig):
        return noise, {}
    from ..sampling.search import search_noise

    s, G = cfg.search, cfg.grpo.group_size
    firsts = prompts[::G]
    cond_kwargs = {} if sources is None else {"image": sources[::G].to(adapter.device)}
    found = search_noise(adapter, firsts, reward=trainee.reward, num_steps=cfg.sampling.num_steps,
                         guidance_scale=cfg.sampling.guidance_scale, height=trainee.height, width=trainee.width,
                         rounds=s.rounds, candidates=s.candidates, keep=s.keep, smoothing=s.smoothing,
                         std_floor=s.std_floor,
                         generator=step_generators(cfg.train.seed, rollout_index, process_index, "grpo-search", len(firsts)),
                         **cond_kwargs)  # fmt: skip
    mean = found.mean.to(noise).repeat_interleave(G, 0)
    std = found.std.to(noise).repeat_interleave(G, 0)
    return mean + std * noise, {"nfe_search": float(found.nfe * len(firsts)), "search_std": float(found.std.mean()),
                               "search_best": float(found.round_best[-1].mean())}


def rollout(trainee: GrpoTrainee, step: int, process_index: int) -> Rollout:
    """``train.batch_size`` prompts x ``group_size`` trajectories with the current weights, scored."""
    cfg, adapter, g = trainee.cfg, trainee.adapter, trainee.cfg.grpo
    index = step // g.updates_per_rollout  # the rollout's own counter: prompts and noise derive from it
    batch = trainee.data.batch(index, process_index)
    G = g.group_size
    prompts = [p for p in batch.prompts for _ in range(G)]
    sources = None if batch.images is None else batch.images.repeat_interleave(G, 0)
    n, chunk = len(prompts), g.train_batch_size or G
    window, trained = rollout_window(cfg, step_rng(cfg.train.seed, index, process_index, "grpo-window"))
    step_noise = step_generators(cfg.train.seed, index, process_index, "grpo-steps", n)
    sched = adapter.schedule(cfg.sampling.num_steps, height=trainee.height, width=trainee.width)
    denoiser = pipelines.unwrap_model(adapter.denoiser)
    was_training = denoiser.training
    denoiser.eval()
    with torch.no_grad():
        x, metrics = initial_noise(trainee, prompts, sources, index, process_index)
        latents = torch.empty(n, len(sched) + 1, *x.shape[1:], dtype=x.dtype)
        log_probs, images = torch.zeros(n, len(sched)), []
        for start in range(0, n, chunk):  # the chunks the updates train on: the same batch layout
            rows = slice(start, start + chunk)
            cond = trainee.encode(prompts[rows], None if sources is None else sources[rows])
            xc = x[rows]
            latents[rows, 0] = xc.cpu()
            for i in range(len(sched)):
                out = adapter.predict(xc, sched, i, cond)
                if i in window:
                    s = adapter.step_with_logprob(out, sched, i, xc, method=trainee.step_type,
                                                  noise_level=trainee.noise_level, generator=step_noise[rows])  # fmt: skip
                    xc, log_probs[rows, i] = s.prev_sample, s.log_prob.cpu()
                else:
                    xc = adapter.step(out, sched, i, xc, generator=step_noise[rows])
                latents[rows, i + 1] = xc.cpu()
            images.append(adapter.decode(xc))
        images = torch.cat(images)
        scores = score(trainee.reward, images, prompts, sources).float().cpu()
    denoiser.train(was_training)
    advantages = rollout_advantages(scores.view(-1, G), trainee.context, clip=g.advantage_clip, std=g.advantage_std).flatten()
    metrics.update(nfe_rollout=float(n * len(sched)), zero_spread_groups=float((scores.view(-1, G).std(1) == 0).float().mean()))
    return Rollout(step, prompts, sources, latents, log_probs, scores, advantages, trained, metrics)


# ============================================================================ the step
def grpo_step(trainee: GrpoTrainee, micro: MicroStep) -> StepLoss:
    """One micro-step: one trained step of one rollout chunk (a rollout first, at an update's start)."""
    cfg, adapter, g = trainee.cfg, trainee.adapter, trainee.cfg.grpo
    accum = cfg.train.gradient_accumulation_steps
    m = micro.index - micro.step * accum  # position inside this optimizer step
    rewards = None
    # ---------------------------------------------------------------- SAMPLE (once per rollout)
    first_step = micro.step - micro.step % g.updates_per_rollout
    if trainee.rollout is None or trainee.rollout.step != first_step:
        if micro.step != first_step and trainee.rollout is None:
            raise RuntimeError(f"step {micro.step} trains on the rollout of step {first_step}, which is not in memory "
                               "(resumed from a checkpoint without it)")  # fmt: skip
        trainee.rollout = rollout(trainee, first_step, micro.process_index)
        rewards = trainee.rollout.scores
    r = trainee.rollout
    metrics = dict(r.metrics)
    # ---------------------------------------------------------------- which chunk and which step
    c, k, rows = layout(cfg).locate(micro.step - first_step, m)
    i = r.trained[k]
    sched = adapter.schedule(cfg.sampling.num_steps, height=trainee.height, width=trainee.width)
    x, x_next = r.latents[rows, i].to(adapter.device), r.latents[rows, i + 1].to(adapter.device)
    if r.encoded is None or r.encoded[0] != c:  # a chunk's trained steps are consecutive micro-steps: encode it once
        r.encoded = (c, trainee.encode(r.prompts[rows], None if r.sources is None else r.sources[rows]))
    cond = r.encoded[1]
    # ---------------------------------------------------------------- SCORE the stored transition under the policy
    step_kw = {"method": trainee.step_type, "noise_level": trainee.noise_level, "prev_sample": x_next}
    policy = adapter.step_with_logprob(adapter.predict(x, sched, i, cond), sched, i, x, **step_kw)
    # ---------------------------------------------------------------- LOSS
    advantages = r.advantages[rows].to(policy.log_prob.device)
    ppo = ppo_clip_loss(policy.log_prob, r.log_probs[rows, i].to(policy.log_prob.device), advantages, g.clip_range)
    loss = ppo.loss
    if g.beta > 0:
        with torch.no_grad(), reference_denoiser(trainee):
            reference = adapter.step_with_logprob(adapter.predict(x, sched, i, cond), sched, i, x, **step_kw)
        kl = step_mean_kl(policy.mean, reference.mean, policy.std).mean()
        loss = loss + g.beta * kl
        metrics["kl"] = float(kl.detach())
    log_ratio = policy.log_prob.detach() - r.log_probs[rows, i].to(policy.log_prob.device)
    metrics.update(policy_loss=float(ppo.loss.detach()), ratio_mean=float(ppo.ratio.mean()),
                   ratio_min=float(ppo.ratio.min()), ratio_max=float(ppo.ratio.max()),
                   clip_fraction=float(ppo.clipped.float().mean()), approx_kl=float(0.5 * (log_ratio**2).mean()),
                   advantage_abs=float(advantages.abs().mean()),
                   nfe_total=float(function_evaluations(cfg, micro.step + 1)))  # fmt: skip
    return StepLoss(loss, metrics, rewards=rewards)


def function_evaluations(cfg: GrpoTrainingConfig, steps: int) -> int:
    """Denoiser evaluations per process after ``steps`` optimizer steps: rollouts, updates and search.

    One evaluation is one image through the denoiser at one step (a CFG pair counts once);
    an update's forward + backward counts as one, its reference forward (beta > 0) as another.
    """
    g = cfg.grpo
    images = cfg.train.batch_size * g.group_size
    rollouts = (steps - 1) // g.updates_per_rollout + 1
    per_rollout = images * cfg.sampling.num_steps
    if isinstance(cfg, SmartGrpoTrainingConfig):
        s = cfg.search
        per_rollout += cfg.train.batch_size * s.rounds * s.candidates
    per_update = images // g.updates_per_rollout * trained_steps_per_rollout(cfg) * (2 if g.beta > 0 else 1)
    return rollouts * per_rollout + steps * per_update


GRPO = Method("grpo", GrpoTrainingConfig, setup=setup, step=grpo_step, check=check_config)
SMART_GRPO = Method("smart-grpo", SmartGrpoTrainingConfig, setup=setup, step=grpo_step, check=check_config)

__all__ = ["GRPO", "SMART_GRPO", "GrpoConfig", "GrpoTrainee", "GrpoTrainingConfig", "NoiseSearchConfig", "Rollout",
           "SmartGrpoTrainingConfig", "function_evaluations", "grpo_step", "rollout", "rollout_window"]  # fmt: skip
