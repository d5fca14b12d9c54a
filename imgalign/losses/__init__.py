"""Pure loss functions: tensors in, tensors out, each citing its paper and equation."""

from .nft import NftLossOutput, nft_loss, optimality_probability
from .policy_gradient import PpoClipOutput, group_advantages, ppo_clip_loss, step_mean_kl
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
    "NftLossOutput",
    "PpoClipOutput",
    "PreferenceLossOutput",
    "alignprop_truncation_step",
    "denoising_loss",
    "denoising_target",
    "diffusion_dpo_loss",
    "diffusion_kto_loss",
    "draft_loss",
    "draft_lv_loss",
    "group_advantages",
    "imagerefl_loss",
    "nft_loss",
    "optimality_probability",
    "per_sample_error",
    "ppo_clip_loss",
    "refl_loss",
    "refl_stop_step",
    "reward_weighted_loss",
    "step_mean_kl",
    "winner_preserving_scale",
]
