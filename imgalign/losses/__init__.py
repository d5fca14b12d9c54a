"""Pure loss functions: tensors in, tensors out, each citing its paper and equation."""

from .reward_backprop import (
    alignprop_truncation_step,
    denoising_loss,
    denoising_target,
    draft_loss,
    draft_lv_loss,
    imagerefl_loss,
    refl_loss,
    refl_stop_step,
)

__all__ = [
    "alignprop_truncation_step",
    "denoising_loss",
    "denoising_target",
    "draft_loss",
    "draft_lv_loss",
    "imagerefl_loss",
    "refl_loss",
    "refl_stop_step",
]
