"""The reward contract: images in ``[0,1]``, one differentiable score per image out.

Every reward is a :class:`torch.nn.Module` subclass of :class:`Reward`:

* ``reward(images, prompts, **cond)`` (alias ``reward.score``) validates its inputs and
  returns ``Tensor[B]``; it is differentiable with respect to ``images``.
* ``reward.score_batched(images, prompts, batch_size=32, autocast=...)`` is the ``no_grad``
  path for datasets: it chunks everything along the batch and concatenates the results.
* ``reward.info`` (:class:`RewardInfo`) says what the reward needs and what it returns.

Subclasses implement ``_score(images, prompts, **cond)`` and receive already validated
inputs: float images clamped to ``[0,1]``, ``prompts`` as a list of ``B`` strings (or
``None`` when the reward takes no text), and conditioning images of the same batch size.

Optional: a reward that judges several aspects (an exact oracle, a multi-head model) can
override ``details(images, prompts, **cond)`` to return one ``{aspect: value}`` dict per
image, and ``summarize_details(rows)`` to name their aggregate; evaluation reports use both
without knowing which reward they hold. The default ``details`` returns ``None``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

__all__ = ["RANGE_TOLERANCE", "Reward", "RewardInfo", "validate_images"]

#: Values this far outside ``[0,1]`` are accepted (and clamped): decoders and resamplers
#: overshoot by a few ULPs; anything larger is almost always a ``[-1,1]`` mix-up.
RANGE_TOLERANCE = 1e-3

#: Conditioning inputs a reward may require besides ``images``.
CONDITION_INPUTS = ("source_images", "reference_images")


@dataclass(frozen=True)
class RewardInfo:
    """What a reward needs, what it returns and where it comes from.

    ``mean``/``std`` are constants that standardise *this reward's output* when the model's
    authors publish them (``None`` otherwise: a :class:`~rewards.composite.CompositeReward`
    then keeps running statistics). ``score_range`` is the expected, not guaranteed, range.
    """

    name: str
    inputs: tuple[str, ...] = ("images", "prompts")
    differentiable: bool = True
    source: str = ""
    score_range: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def needs_prompts(self) -> bool:
        return "prompts" in self.inputs

    def with_name(self, name: str) -> RewardInfo:
        return replace(self, name=name)


def validate_images(images, what: str = "images", batch_size: int | None = None) -> Tensor:
    """Check a ``[B,3,H,W]`` float tensor in ``[0,1]`` and return it clamped to ``[0,1]``.

    Raises ``ValueError`` naming the problem (type, rank, channels, dtype, range, batch).
    Clamping inside the tolerance uses a straight-through clamp so gradients still flow.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{what} must have rank 4 [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(
            f"{what} must have 3 channels in dim 1 ([B,3,H,W], RGB), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0,1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if batch_size is not None and images.shape[0] != batch_size:
        raise ValueError(f"{what} has batch size {images.shape[0]} but images has {batch_size}")
    with torch.no_grad():
        lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = " (looks like [-1,1]: use (x + 1) / 2)" if lo < -0.01 else ""
        raise ValueError(f"{what} values must be in [0,1], got min {lo:.4g} max {hi:.4g}{hint}")
    if lo < 0 or hi > 1:
        # straight-through clamp: value clamped, gradient of identity
        images = images + (images.clamp(0, 1) - images).detach()
    return images


def _normalize_prompts(prompts, batch: int, name: str) -> list[str]:
    if prompts is None:
        raise ValueError(f"reward {name!r} needs prompts (one string, or one per image)")
    if isinstance(prompts, str):
        return [prompts] * batch
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a sequence of strings, got {type(prompts).__name__}")
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images: give one prompt per image (or one string)")
    return list(prompts)


class Reward(nn.Module):
    """Base class: validation, the ``score`` alias and the batched ``no_grad`` path."""

    info: RewardInfo = RewardInfo(name="reward")

    # -- to implement -------------------------------------------------------------------
    def _score(self, images: Tensor, prompts: list[str] | None, **cond: Tensor) -> Tensor:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def validate(self, images, prompts=None, **cond) -> tuple[Tensor, list[str] | None, dict[str, Tensor]]:
        """Check inputs against :attr:`info` and return them in canonical form."""
        images = validate_images(images)
        batch = images.shape[0]
        texts = _normalize_prompts(prompts, batch, self.info.name) if self.info.needs_prompts else None
        out: dict[str, Tensor] = {}
        for key in CONDITION_INPUTS:
            value = cond.get(key)
            if key in self.info.inputs:
                if value is None:
                    raise ValueError(f"reward {self.info.name!r} needs {key}=Tensor[B,3,H,W] in [0,1]")
                value = validate_images(value, key)
                if value.shape[0] == 1 and batch > 1:
                    value = value.expand(batch, -1, -1, -1)
                if value.shape[0] != batch:
                    raise ValueError(f"{key} has batch size {value.shape[0]} but images has {batch}")
                out[key] = value
        unknown = set(cond) - set(CONDITION_INPUTS)
        if unknown:
            raise ValueError(f"unexpected keyword(s) {sorted(unknown)}; known: {list(CONDITION_INPUTS)}")
        return images, texts, out

    def forward(self, images: Tensor, prompts: str | Sequence[str] | None = None, **cond: Tensor) -> Tensor:
        images, texts, extra = self.validate(images, prompts, **cond)
        scores = self._score(images, texts, **extra)
        return scores.reshape(images.shape[0]).float()

    def score(self, images: Tensor, prompts: str | Sequence[str] | None = None, **cond: Tensor) -> Tensor:
        """Alias of ``self(images, prompts, **cond)``: ``Tensor[B]``, differentiable."""
        return self(images, prompts, **cond)

    @torch.no_grad()
    def score_batched(
        self,
        images: Tensor,
        prompts: str | Sequence[str] | None = None,
        batch_size: int = 32,
        autocast: torch.dtype | bool | None = None,
        **cond: Tensor,
    ) -> Tensor:
        """Score a dataset-sized batch in chunks of ``batch_size`` without gradients.

        ``autocast``: ``None``/``False`` runs in the model's dtype; ``True`` autocasts to
        bfloat16 (CPU) or float16 (CUDA); a dtype autocasts to that dtype. Inputs may live
        on the CPU: each chunk is moved to the reward's device, results come back on the
        device of ``images``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = validate_images(images)
        batch = images.shape[0]
        texts = _normalize_prompts(prompts, batch, self.info.name) if self.info.needs_prompts else prompts
        device = self.device
        outs = []
        for start in range(0, batch, batch_size):
            stop = min(start + batch_size, batch)
            chunk_cond = {}
            for key, value in cond.items():
                if isinstance(value, Tensor) and value.shape[0] == batch:
                    value = value[start:stop]
                chunk_cond[key] = value.to(device) if isinstance(value, Tensor) else value
            chunk_texts = texts[start:stop] if isinstance(texts, list) else texts
            with self._autocast(device, autocast):
                outs.append(self(images[start:stop].to(device), chunk_texts, **chunk_cond).float())
        return torch.cat(outs).to(images.device)

    @staticmethod
    def _autocast(device: torch.device, autocast):
        if autocast is None or autocast is False:
            return contextlib.nullcontext()
        dtype = autocast if isinstance(autocast, torch.dtype) else (
            torch.float16 if device.type == "cuda" else torch.bfloat16
        )
        return torch.autocast(device_type=device.type, dtype=dtype)

    # -- optional: a per-image breakdown ------------------------------------------------
    def details(
        self, images: Tensor, prompts: str | Sequence[str] | None = None, **cond: Tensor
    ) -> list[dict[str, float]] | None:
        """Per-image breakdown for evaluation reports, or ``None`` when the reward has none.

        One dict per image, the same float-valued keys for every image (``{"overall": 1.0,
        "colour": 0.5, ...}``): reports keep each key as a per-image aspect, so a gain can be
        measured aspect by aspect on the same prompts and seeds. Not differentiable.
        """
        return None

    def summarize_details(self, details: Sequence[dict[str, float]]) -> dict[str, float]:
        """The report row of :meth:`details`' output: ``n`` and the mean of every key."""
        out: dict[str, float] = {"n": len(details)}
        for key in details[0] if details else ():
            out[key] = float(sum(float(row[key]) for row in details) / len(details))
        return out

    def train(self, mode: bool = True) -> Reward:
        """Set the *reward's* mode; the wrapped networks stay in eval mode.

        Training mode only means "update running statistics" (see
        :class:`~rewards.composite.CompositeReward`): dropout in a reward network would make
        the reward noisy. To fine-tune a network, call ``.train()`` on it directly.
        """
        for module in self.modules():
            module.training = mode if isinstance(module, Reward) else False
        return self

    def extra_repr(self) -> str:
        return f"name={self.info.name!r}, inputs={self.info.inputs}"
