"""Method-agnostic pieces of a training loop on accelerate.

The run skeleton (:mod:`imgalign.train.run`) and the pipeline setup
(:mod:`imgalign.train.pipeline`) are built from these small components:

* :func:`build_accelerator` — mixed precision, gradient accumulation, trackers;
* :func:`step_seed` / :func:`step_generators` — every random draw of a step is seeded from
  ``(seed, step, process index, stream)``: each process draws different noise (flow_grpo
  #7: identical noise on every GPU) and a resumed run redraws exactly what the
  uninterrupted run drew, with no generator state to carry;
* :func:`setup_trainable`, :func:`build_optimizer` — LoRA or full fine-tuning, AdamW and a
  diffusers LR schedule;
* :class:`GradientStep` — cross-process gradient averaging (plain data parallelism; under
  FSDP the reduce-scatter averages, see :mod:`imgalign.train.sharding`), clipping, the
  non-finite guard, optimizer/LR/EMA steps;
* :class:`RunLogger` — ``metrics.jsonl``, accelerate trackers (TensorBoard, wandb) and a tqdm
  bar with ETA.

Why gradients are averaged by hand instead of wrapping the denoiser in DDP: reward
backpropagation calls the denoiser a step-dependent number of times per update, some calls
checkpointed and some under ``no_grad``; DDP's reducer needs ``find_unused_parameters`` /
``static_graph`` for that, and the adapters read ``denoiser.config``, which a DDP wrapper
hides. One all-reduce of the trainable gradients per optimizer step is what DDP would do
(``tests/test_fsdp.py`` checks it against ``torch.nn.parallel.DistributedDataParallel``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pipelines

from ..images import to_uint8
from .config import LoopConfig, LoraConfig, OptimConfig

logger = logging.getLogger("imgalign.train")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


# ============================================================================ accelerator
def build_accelerator(loop: LoopConfig, output_dir: str | Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = []
    for name in loop.report_to:
        if name == "tensorboard":
            trackers.append("tensorboard")
        elif name == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("train.report_to lists wandb but wandb is not installed (pip install wandb)")
            trackers.append("wandb")
        elif name not in ("none", ""):
            raise ValueError(f"unknown tracker {name!r} in train.report_to: use tensorboard, wandb or none")
    from .sharding import check_launch_config

    check_launch_config(loop)
    output_dir = Path(output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Under torchrun / `accelerate launch --multi_gpu` on a machine with no GPU, accelerate
    # runs the workers as independent single processes unless told to use CPU (gloo).
    cpu = world_size > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=loop.mixed_precision,
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched with WORLD_SIZE={world_size} but accelerate runs {accelerator.num_processes} process(es); "
            "check the accelerate launch flags"
        )
    return accelerator


def weight_dtype(model_dtype: str, mixed_precision: str) -> torch.dtype:
    """Frozen weights live in the mixed-precision dtype unless the recipe says otherwise."""
    return DTYPES[mixed_precision if model_dtype == "auto" else model_dtype]


# ============================================================================ seeding
def step_seed(seed: int, step: int, process_index: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one (micro-)step on one process."""
    stream_id = zlib.crc32(stream.encode())
    state = np.random.SeedSequence([seed, step, process_index, stream_id]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def step_generators(seed: int, step: int, process_index: int, stream: str, n: int) -> list[torch.Generator]:
    """One CPU generator per image (the adapters draw per-image noise from a list of generators)."""
    return [torch.Generator("cpu").manual_seed(step_seed(seed, step, process_index, f"{stream}/{k}")) for k in range(n)]


def step_rng(seed: int, step: int, process_index: int, stream: str) -> random.Random:
    """A Python RNG for discrete choices (stop step, truncation point)."""
    return random.Random(step_seed(seed, step, process_index, stream))


def randn_like_per_image(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, image ``b`` drawn from ``generators[b]``."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(tuple(like.shape), generator=generators, device=like.device, dtype=torch.float32)


# ============================================================================ trainable weights
def setup_trainable(adapter: pipelines.DiffusionAdapter, lora: LoraConfig,
                    adapter_names: Sequence[str] = ("default",)) -> dict[str, torch.nn.Parameter]:  # fmt: skip
    """Add LoRA (default) or unfreeze the whole denoiser; return the trainable params by name.

    Several ``adapter_names`` add one LoRA each (timestep-segment DPO's per-segment adapters).

    Full fine-tuning keeps the denoiser in fp32 (AdamW on half-precision weights loses
    small updates); the frozen VAE and text encoders stay in their dtype.
    """
    denoiser = pipelines.unwrap_model(adapter.denoiser)
    if lora.enabled:
        for name in adapter_names:
            pipelines.add_lora(adapter, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                               adapter_name=name)  # fmt: skip
        if len(adapter_names) > 1:  # peft trains only the active adapter: collect them all by name
            return {n: p for n, p in denoiser.named_parameters() if any(f".{a}." in n for a in adapter_names)}
    else:
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(adapter.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        denoiser.to(torch.float32)
        denoiser.requires_grad_(True)
    return {n: p for n, p in denoiser.named_parameters() if p.requires_grad}


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, max_steps: int) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        list(params), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    lr_scheduler = get_scheduler(
        optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=max_steps
    )
    return optimizer, lr_scheduler


def plain_step(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], optimizer: Any, lr_schedule: Any,
               max_norm: float = 1.0) -> None:  # fmt: skip
    """One single-process update: backward, clip the gradient norm, optimizer and LR steps.

    For the small trainers that run without accelerate (the Shapes models); the recipes use
    :class:`GradientStep`.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    lr_schedule.step()


def broadcast_parameters(params: Iterable[torch.nn.Parameter], accelerator: Any) -> None:
    """Start every process from the main process's weights (what DDP does at wrap time)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    with torch.no_grad():
        for p in params:
            p.copy_(broadcast(p.data.clone(), from_process=0))


# ============================================================================ the update
@dataclass
class StepOutcome:
    grad_norm: float
    applied: bool  # False: skipped (non-finite loss/gradient, or an fp16 overflow)
    nonfinite: bool  # counts towards the stop-after-N guard


class GradientStep:
    """Average, clip and apply the accumulated gradients, or skip a non-finite step.

    A step is skipped when the loss or the gradient norm is non-finite on *any* process (the
    flag travels with the gradient all-reduce, so all processes agree). ``sharded``: the
    parameters are FSDP shards whose gradients the reduce-scatter has already averaged; only
    the flag is reduced, and the norm is the sharded-aware one (DTensor). With fp16 loss
    scaling an overflow is the scaler's business: the optimizer step is handed to it (it
    skips and lowers the scale) and is not counted as a failure.
    """

    def __init__(self, accelerator: Any, params: list[torch.nn.Parameter], optimizer: Any, lr_scheduler: Any,
                 max_grad_norm: float | None, ema: Any | None = None, sharded: bool = False) -> None:  # fmt: skip
        self.accelerator, self.params, self.sharded = accelerator, params, sharded
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.max_grad_norm, self.ema = max_grad_norm, ema
        self.loss_was_finite = True

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record a micro-batch loss before backward (a NaN loss poisons the whole step)."""
        self.loss_was_finite &= bool(torch.isfinite(loss.detach()).all())

    def __call__(self) -> StepOutcome:
        bad_loss = self._sync_gradients()
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else math.inf
        norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a replicated DTensor
        self.loss_was_finite = True
        if getattr(self.accelerator, "scaler", None) is not None:
            # fp16 loss scaling: the scaler skips non-finite steps itself and lowers its scale.
            self.optimizer.step()
            applied = not self.accelerator.optimizer_step_was_skipped
            self._after_step(applied)
            return StepOutcome(grad_norm, applied=applied, nonfinite=bad_loss)
        if bad_loss or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            return StepOutcome(grad_norm, applied=False, nonfinite=True)
        self.optimizer.step()
        self._after_step(True)
        return StepOutcome(grad_norm, applied=True, nonfinite=False)

    def _after_step(self, applied: bool) -> None:
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied and self.ema is not None:
            self.ema.step(self.params)

    def _sync_gradients(self) -> bool:
        """All-reduce (mean) the trainable gradients and the bad-loss flag; return the flag."""
        flag = torch.tensor([0.0 if self.loss_was_finite else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes == 1:
            return bool(flag.item())
        if self.sharded:
            return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        # A parameter no process gave a gradient (e.g. an inactive segment adapter) keeps
        # grad None, so the optimizer leaves it alone exactly as in a single-process run.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        has_grad = torch.tensor([float(p.grad is not None) for p in self.params], device=flag.device)
        flat = torch.cat([g.detach().float().flatten() for g in grads] + [has_grad, flag])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset, any_grad = 0, flat[-1 - len(self.params) : -1] > 0
        for p, g, used in zip(self.params, grads, any_grad.tolist(), strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype) if used else None
            offset += n
        return bool(flat[-1].item() > 0)


# ============================================================================ logging
class RunLogger:
    """Metrics to ``metrics.jsonl`` + accelerate trackers + a tqdm bar (main process only)."""

    def __init__(self, accelerator: Any, output_dir: str | Path, max_steps: int, start_step: int,
                 project: str, config: dict[str, Any]) -> None:  # fmt: skip
        from tqdm.auto import tqdm

        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.is_main:
            self._truncate_after(start_step)
            accelerator.init_trackers(project, config=_flat_hparams(config))
        self.bar = tqdm(total=max_steps, initial=start_step, desc=project, unit="step", disable=not self.is_main)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        self.accelerator.log(clean, step=step)
        shown = {k: f"{clean[k]:.4g}" for k in ("loss", "reward_mean") if k in clean}
        self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """Log an image batch [N,3,H,W] in [0,1] to every tracker that takes images."""
        if not self.is_main:
            return
        array = to_uint8(images)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: array}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: list(array)}, step=step)

    def close(self) -> None:
        self.bar.close()
        if self.is_main:
            self.accelerator.end_training()


def _flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams take scalars and strings only."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class StepTimer:
    """Wall time of the last optimizer step and samples per second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self, samples: int) -> tuple[float, float]:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed, samples / max(elapsed, 1e-9)


__all__ = [
    "GradientStep",
    "RunLogger",
    "StepOutcome",
    "StepTimer",
    "TrainingDiverged",
    "broadcast_parameters",
    "build_accelerator",
    "build_optimizer",
    "randn_like_per_image",
    "setup_trainable",
    "step_generators",
    "step_rng",
    "step_seed",
    "weight_dtype",
]
