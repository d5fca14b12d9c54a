"""Pure loss functions: tensors in, tensors out, each citing its paper and equation."""

from .preference import (
    PreferenceLossOutput,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    per_sample_error,
    reward_weighted_loss,
    winner_preserving_scale,
)
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
    "PreferenceLossOutput",
    "alignprop_truncation_step",
    "denoising_loss",
    "denoising_target",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "draft_loss",
    "draft_lv_loss",
    "imagerefl_loss",
    "per_sample_error",
    "refl_loss",
    "refl_stop_step",
    "reward_weighted_loss",
    "winner_preserving_scale",
]
