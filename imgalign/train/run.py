"""The run skeleton every trainer shares: setup and end-of-step bookkeeping around a method's step.

:func:`train` reads top to bottom::

    setup     accelerator, seed, the method's setup (models, reward, data, trainable
              parameters), the trainable module sharded under ``train.distributed: fsdp``
              (:mod:`imgalign.train.sharding`), optimizer + LR schedule + EMA, checkpoints,
              resume, logger
    loop      for each optimizer step, for each micro-batch: the method's step gives a
              loss (SAMPLE / SCORE / loss), backward; then the guarded optimizer step
              (cross-process averaging, clipping, non-finite skip-and-stop), metrics,
              validation, rotated checkpoints
    outputs   final validation and checkpoint, the method's outputs (a LoRA, a pipeline,
              a reward directory)

A method supplies only its config, its ``setup`` (returning a :class:`Trainee`) and its
``step`` (returning a :class:`StepLoss`); see :mod:`imgalign.train.registry`. Randomness
inside a step comes from :class:`MicroStep` (seeded from seed, micro-step, process and a
stream name), so every process draws its own noise and a resumed run redraws exactly what
the uninterrupted run drew.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..images import save_grid
from ..io import ordinary_permissions
from .checkpoint import CheckpointManager, TrainerState, new_run_id, resolve_resume
from .config import TrainingConfig, to_dict, to_yaml
from .loop import (
    GradientStep,
    RunLogger,
    StepTimer,
    TrainingDiverged,
    broadcast_parameters,
    build_accelerator,
    build_optimizer,
    step_generators,
    step_rng,
)
from .model_card import metrics_for_card, write_model_card
from .output_dir import check_output_dir, check_resume_config, clear_output_dir
from .registry import available_methods, get_method
from .sharding import ShardedTrainable, shard_trainable


TRAINEE_STATE = "trainee"  # the prefix of Trainee.state_tensors() in a checkpoint's extra.safetensors


# ============================================================================ what a method sees
@dataclass
class Run:
    """The run a method's setup and step belong to: its config, accelerator and output directory."""

    cfg: Any  # the method's config (a TrainingConfig)
    accelerator: Any
    output_dir: Path

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class MicroStep:
    """One micro-batch: its position (the data and every seed derive from it) and its randomness."""

    step: int  # optimizer steps completed before this one
    index: int  # micro-step counter: step * gradient_accumulation_steps + micro
    process_index: int
    seed: int
    sharded: bool = False  # train.distributed=fsdp: every denoiser call is a collective

    def generators(self, stream: str, n: int) -> list[torch.Generator]:
        """``n`` CPU generators (one per image) for a named random stream of this micro-step."""
        return step_generators(self.seed, self.index, self.process_index, stream, n)

    def rng(self, stream: str) -> random.Random:
        """A Python RNG for discrete choices (a stop step, a truncation point)."""
        return step_rng(self.seed, self.index, self.process_index, stream)

    def steps_rng(self, stream: str) -> random.Random:
        """A Python RNG for choices that decide how many denoiser calls the micro-step makes (a stop step,
        a truncation point): per process, but the same on every process under FSDP, where each
        call of the sharded denoiser is a collective that every process must make."""
        return step_rng(self.seed, self.index, 0 if self.sharded else self.process_index, stream)


@dataclass
class StepLoss:
    """What a method's step returns: the loss to backpropagate and what to log."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)  # averaged over micro-steps and processes
    rewards: torch.Tensor | None = None  # gathered over processes: reward_mean, reward_std


class Trainee:
    """What a method's setup returns: the trainable parameters and the run's outputs.

    Subclasses set ``trainable`` and may override :meth:`validate`, :meth:`save` and
    :meth:`moving_state`; the skeleton calls them (validation and saving on the main
    process, with EMA weights swapped in when ``train.ema_decay`` is set).
    """

    trainable: dict[str, torch.nn.Parameter]

    def validate(self, step: int) -> tuple[dict[str, float], torch.Tensor | None]:
        """Validation metrics and, optionally, images [N,3,H,W] in [0,1] to save as a grid."""
        return {}, None

    def save(self, output_dir: Path) -> Path | None:
        """Write the run's final artifact; return its path."""
        return None

    def moving_state(self) -> dict[str, torch.nn.Module]:
        """Modules whose buffers change while training (a composite reward's running statistics)."""
        return {}

    def trainable_module(self) -> torch.nn.Module | None:
        """The module that holds every trainable weight (the denoiser, the reward model): what
        ``train.distributed=fsdp`` shards. None: this method cannot be sharded."""
        return None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Method state that is neither weights nor optimizer (a rollout buffer shared by several
        optimizer steps, an old policy's weights): saved in every checkpoint so a resumed run
        continues exactly."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (called on resume, after the weights are loaded)."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    weights_dir: Path | None  # the method's artifact (LoRA, pipeline, reward); None if stopped early
    metrics: list[dict[str, float]] = field(default_factory=list)


@contextlib.contextmanager
def ema_weights(ema: Any | None, params: list[torch.nn.Parameter]):
    """Temporarily swap the EMA weights in (validation, saving)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# ============================================================================ the skeleton
def train(cfg: TrainingConfig, *, resume: str | None = None, stop_after_steps: int | None = None,
          overwrite: bool = False) -> TrainResult:
    """Run the registered method ``cfg.method`` with ``cfg``. ``resume``: ``"latest"`` or a checkpoint directory.

    A non-empty ``output_dir`` is refused unless ``resume`` is given (the config must then
    match the resumed run's, but for :data:`~imgalign.train.output_dir.SAFE_TO_CHANGE_ON_RESUME`)
    or ``overwrite`` (the previous run's files are removed first); see :mod:`imgalign.train.output_dir`.

    ``stop_after_steps`` ends this invocation after that many optimizer steps in total
    (saving a checkpoint), as a preemptible job would; the schedules still target
    ``train.max_steps``, so a resumed run continues exactly where the interrupted one was.
    """
    method = get_method(cfg.method)
    if method.check is not None:
        method.check(cfg)
    loop = cfg.train
    lora = getattr(cfg, "lora", None)
    if loop.distributed == "fsdp" and lora is not None and lora.enabled:
        raise ValueError("train.distributed=fsdp shards full fine-tuning: set lora.enabled=false, or train the LoRA "
                         "with train.distributed=ddp (its weights and optimizer state are small)")  # fmt: skip
    if loop.gradient_accumulation_steps < 1 or loop.batch_size < 1 or loop.max_steps < 1:
        raise ValueError("train.max_steps, train.batch_size and train.gradient_accumulation_steps must be >= 1")
    out_dir = Path(cfg.output_dir)
    check_output_dir(out_dir, resume=resume, overwrite=overwrite)  # read-only, on every process
    resume_from = resolve_resume(resume, out_dir / "checkpoints")
    if resume is not None:  # the same run, or refuse: before any model loads or config.yaml is replaced
        check_resume_config(resume_from or out_dir, out_dir, to_dict(cfg))
    accelerator = build_accelerator(loop, out_dir)
    if overwrite and accelerator.is_main_process:
        clear_output_dir(out_dir)
    accelerator.wait_for_everyone()
    device, rank = accelerator.device, accelerator.process_index

    # ------------------------------------------------------------------ setup
    from accelerate.utils import set_seed

    set_seed(loop.seed)  # same on every process: identical initialisation of new weights
    run = Run(cfg, accelerator, out_dir)
    trainee = method.setup(run)
    named_params = trainee.trainable
    params = list(named_params.values())
    if not params:
        raise ValueError(f"{method.name}: nothing to train (no parameter requires a gradient)")
    broadcast_parameters(params, accelerator)
    sharded: ShardedTrainable | None = None
    if loop.distributed == "fsdp":  # see imgalign.train.sharding
        module = trainee.trainable_module()
        if module is None:
            raise ValueError(f"{method.name} cannot be sharded (its Trainee names no trainable_module()); "
                             "use train.distributed=ddp")  # fmt: skip
        sharded = shard_trainable(module, named_params, loop, device)
        named_params = sharded.named_trainable()
        params = list(named_params.values())
        with contextlib.suppress(AttributeError):  # a trainee whose `trainable` is a property sees the shards already
            trainee.trainable = named_params

    optimizer, lr_scheduler = build_optimizer(params, cfg.optim, loop.max_steps)
    if sharded is None:  # FSDP: no loss scaling (fp16 is refused), the shards are already placed
        optimizer = accelerator.prepare(optimizer)  # loss scaling (fp16) and device placement
    scaler = getattr(accelerator, "scaler", None)  # fp16's GradScaler; None otherwise
    ema = None
    if loop.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=loop.ema_decay)

    checkpoints = CheckpointManager(out_dir / "checkpoints", total_limit=loop.checkpoints_total_limit,
                                    process_index=rank, is_main=accelerator.is_main_process,
                                    barrier=accelerator.wait_for_everyone, sharded=sharded)  # fmt: skip
    config_yaml = to_yaml(cfg)
    state = TrainerState(run_id=new_run_id())  # a resume takes the checkpoint's run_id
    moving = trainee.moving_state()
    if resume_from is not None:
        state = checkpoints.load(resume_from, trainable=named_params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                 ema=ema, extra_modules=moving, scaler=scaler)  # fmt: skip
        trainee.load_state_tensors(checkpoints.load_extra(resume_from, TRAINEE_STATE))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    elif resume == "latest":
        accelerator.print("no checkpoint to resume from: starting a new run")
    if accelerator.is_main_process:  # after a resume loaded: a checkpoint that fails leaves the directory as it was
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)

    update = GradientStep(accelerator, params, optimizer, lr_scheduler, cfg.optim.max_grad_norm, ema,
                          sharded=sharded is not None)  # fmt: skip
    run_log = RunLogger(accelerator, out_dir, loop.max_steps, state.step, f"imgalign-{method.name}", to_dict(cfg))
    timer = StepTimer()
    accum = loop.gradient_accumulation_steps
    global_batch = loop.batch_size * accum * accelerator.num_processes
    history: list[dict[str, float]] = []
    last_checkpoint: Path | None = resume_from

    def run_validation(step: int) -> dict[str, float]:
        if sharded is None and not accelerator.is_main_process:
            return {}
        # FSDP: every process runs the (identical, fixed-seed) validation, since each call of the
        # sharded model is a collective; the main process keeps the results.
        with ema_weights(ema, params):
            metrics, images = trainee.validate(step)
        if sharded is not None:
            sharded.reshard()
            if not accelerator.is_main_process:
                return {}
        if images is not None:
            save_grid(images, out_dir / "validation" / f"step-{step:06d}.png")
            run_log.images(step, "validation", images)
        return metrics

    def save_checkpoint() -> Path:
        extra = {f"{prefix}.{name}": buf for prefix, module in moving.items()
                 for name, buf in module.named_buffers() if ".stats." in f".{name}"}  # fmt: skip
        extra.update({f"{TRAINEE_STATE}.{name}": value for name, value in trainee.state_tensors().items()})
        return checkpoints.save(state, trainable=named_params, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                ema=ema, extra=extra, config_yaml=config_yaml, scaler=scaler)  # fmt: skip

    if state.step == 0 and cfg.validation.every > 0:
        metrics = run_validation(0)
        if metrics:
            run_log.log(0, metrics)
            history.append({"step": 0, **metrics})
    accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ loop
    while state.step < loop.max_steps:
        sums: dict[str, float] = {}
        rewards_seen: list[torch.Tensor] = []
        for micro in range(accum):
            micro_step = MicroStep(state.step, state.step * accum + micro, rank, loop.seed, sharded=sharded is not None)
            with accelerator.accumulate():
                with accelerator.autocast():
                    out = method.step(trainee, micro_step)  # SAMPLE / SCORE / loss: the method's own body
                update.note_loss(out.loss)
                accelerator.backward(out.loss)
            for key, value in {"loss": out.loss, **out.metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value) / accum
            if out.rewards is not None:
                rewards_seen.append(out.rewards.detach().float())
        # ---------------------------------------------------------------- UPDATE (step)
        outcome = update()
        state.step += 1
        state.samples_seen += global_batch
        if outcome.nonfinite:
            state.nonfinite_in_a_row += 1
            state.skipped_steps += 1
            accelerator.print(f"step {state.step}: non-finite loss or gradient ({sums.get('loss')}, grad norm "
                              f"{outcome.grad_norm}); step skipped ({state.nonfinite_in_a_row} in a row)")  # fmt: skip
        else:
            state.nonfinite_in_a_row = 0
        if accelerator.num_processes > 1 and sums:  # log means over processes, not the main one's
            keys = sorted(sums)
            means = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=device), reduction="mean")
            sums = dict(zip(keys, means.tolist(), strict=True))
        elapsed, throughput = timer.lap(global_batch)
        metrics = {**sums, "grad_norm": outcome.grad_norm, "lr": lr_scheduler.get_last_lr()[0],
                   "step_time_s": elapsed, "samples_per_s": throughput, "skipped": float(not outcome.applied)}  # fmt: skip
        if scaler is not None:
            metrics["loss_scale"] = float(scaler.get_scale())  # after this step's update
        if rewards_seen:
            all_r = accelerator.gather(torch.cat(rewards_seen).to(device))
            metrics["reward_mean"] = float(all_r.mean())
            metrics["reward_std"] = float(all_r.std(unbiased=False))
        if state.nonfinite_in_a_row >= loop.max_nonfinite_steps:
            run_log.log(state.step, metrics)
            run_log.close()
            where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise TrainingDiverged(
                f"{state.nonfinite_in_a_row} non-finite steps in a row (up to step {state.step}); stopping. {where}"
            )
        if cfg.validation.every > 0 and state.step % cfg.validation.every == 0 and state.step < loop.max_steps:
            metrics.update(run_validation(state.step))
        if state.step % loop.log_every == 0 or state.step == loop.max_steps:
            run_log.log(state.step, metrics)
        history.append({"step": state.step, **metrics})
        run_log.advance()
        stopping = stop_after_steps is not None and state.step >= stop_after_steps and state.step < loop.max_steps
        if (loop.checkpoint_every and state.step % loop.checkpoint_every == 0) or stopping:
            if state.nonfinite_in_a_row == 0:
                last_checkpoint = save_checkpoint()
        if stopping:
            run_log.close()
            accelerator.print(f"stopped after step {state.step}; resume with --resume latest")
            return TrainResult(out_dir, state.step, None, history)

    # ------------------------------------------------------------------ outputs
    final_metrics = run_validation(state.step)
    if final_metrics:
        run_log.log(state.step, final_metrics)
        history.append({"step": state.step, **final_metrics})
    if loop.checkpoint_every and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{state.step:06d}")):
        save_checkpoint()
    weights_dir = None
    if sharded is None:
        if accelerator.is_main_process:
            with ema_weights(ema, params):
                weights_dir = trainee.save(out_dir)
    else:  # every process swaps the EMA shards in and gathers; the main process writes plain full weights
        with ema_weights(ema, params), sharded.unsharded_on_main(accelerator.is_main_process):
            if accelerator.is_main_process:
                weights_dir = trainee.save(out_dir)
    if accelerator.is_main_process:
        if weights_dir is not None and Path(weights_dir).is_dir():
            ordinary_permissions(weights_dir)  # safetensors writes 0600 files whatever the umask
            write_model_card(weights_dir, config=to_dict(cfg), method=method.name,
                             method_help=method.help or available_methods().get(method.name, ""),
                             steps=state.step, metrics=metrics_for_card(history))  # fmt: skip
    accelerator.wait_for_everyone()
    run_log.close()
    return TrainResult(out_dir, state.step, weights_dir, history)


__all__ = ["MicroStep", "Run", "StepLoss", "TrainResult", "Trainee", "TrainingDiverged", "ema_weights", "train"]
