"""The demo's methods: names, what each trains or samples, and their settings (no torch import).

``imgalign demo --algo NAME`` and ``imgalign demo --help`` read this table; the demo itself
(:mod:`imgalign.shapes.demo`) runs it. Kept apart so that listing the methods does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRAIN_REWARD = "shapes-verifier"  # what the methods optimise (or select by)


@dataclass
class Algorithm:
    """One demo method: how it trains (a reward-backprop config) and how it then samples."""

    name: str
    summary: str
    train_method: str | None = None  # a registered training method (draft, dpo, grpo, nft, ...), or None (test-time only)
    overrides: dict[str, Any] = field(default_factory=dict)
    sampler: str = "ode"
    sampler_options: dict[str, Any] = field(default_factory=dict)


# The reward-gradient settings all methods share (a LoRA on the UNet's attention and
# convolutions, the learned verifier reward, 10-step sampling as in the evaluation).
COMMON = {
    "pipeline": "shapes",
    "reward": TRAIN_REWARD,
    "reward_options": {},
    # LoRA on the convolutions too: in a pixel-space model the late steps act through the
    # full-resolution ResNet blocks, which have no attention layers to adapt.
    "lora": {"rank": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_out"]},
    "optim": {"lr": 1e-3, "warmup_steps": 3, "weight_decay": 0.0},
    "train": {"max_steps": 40, "batch_size": 8, "mixed_precision": "no", "report_to": [], "log_every": 1},
    "sampling": {"num_steps": 10, "guidance_scale": 3.0, "height": 32, "width": 32},
    # Alignment trains on held-out-kind prompts disjoint from the evaluated ones (see prompt_sets).
    "data": {"prompts": "shapes-heldout-align"},
    "validation": {"num_images": 0},
}

# Timestep-segment DPO's labellers: the half of the oracle each segment decides (seg0 = the
# late, low-noise steps; seg1 = the early, high-noise ones).
TPO_SEGMENTS = [{"reward": "shapes-oracle", "reward_options": {"aspect": "appearance"}},
                {"reward": "shapes-oracle", "reward_options": {"aspect": "layout"}}]  # fmt: skip

def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# GRPO as recipes/shapes_oracle_grpo.yaml: the oracle as a rule-based reward (as GenEval's detector
# is for Flow-GRPO), a 4-step SDE window early in the chain, 3 of its steps trained.
GRPO_OVERRIDES = {
    "reward": "shapes-oracle",
    "lora": {"rank": 16, "alpha": 32},
    "train": {"batch_size": 2},
    "grpo": {"group_size": 8, "train_batch_size": 8, "window": 4, "window_range": [0, 2], "timestep_fraction": 0.75,
             "beta": 0.01},
}

# DiffusionNFT as recipes/shapes_oracle_nft.yaml: the oracle as the reward, ODE rollouts with CFG 3 (the
# CFG-free default leaves most of the base model's groups without spread), 3 of 10 noise levels trained.
NFT_OVERRIDES = {
    "reward": "shapes-oracle",
    "optim": {"weight_decay": 1e-4},
    "train": {"batch_size": 4, "ema_decay": 0.9},
    "nft": {"group_size": 8, "train_batch_size": 16, "timestep_fraction": 0.3, "beta": 1.0, "kl_weight": 1e-4,
            "cfg_free": False},
}

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("best-of-n", "best of 8 samples under the learned reward (no training)", None,
                  sampler="best-of-n", sampler_options={"n": 8}),
        # Test-time search at about best-of-8's budget (80 function evaluations per image at 10 steps).
        Algorithm("noise-search", "Smart-GRPO's noise search (arXiv:2510.02654) under the learned reward: 4 rounds of "
                  "16 one-step-decoded noises refit a Gaussian, then one sample from the best noise (74 NFE at 10 "
                  "steps; no training)", None, sampler="noise-search", sampler_options={"n": 16, "search": {"rounds": 4}}),
        Algorithm("path-search", "search over paths (Ma et al. 2025) under the learned reward: 3 paths, each "
                  "re-noised into 2 branches per round, the 3 best kept (72 NFE at 10 steps; no training)", None,
                  sampler="path-search", sampler_options={"n": 3, "search": {"branches": 2}}),
        Algorithm("speculative", "speculative rejection under the learned reward: 14 candidates, the worst half "
                  "dropped by their x0 estimates' reward before steps T/3 and 2T/3 (79 NFE at 10 steps; no training)",
                  None, sampler="speculative", sampler_options={"n": 14}),
        Algorithm("draft", "DRaFT-K (Clark et al. 2024): backprop through the last K sampling steps", "draft",
                  {"draft": {"k": 4}}),
        Algorithm("refl", "ReFL (Xu et al. 2023): one gradient step from a random late step to x0", "refl",
                  {"refl": {"window": [4, 8]}}),
        Algorithm("imagerefl", "ImageReFL (Sorokin et al. 2025): ReFL from noised real images + denoising loss",
                  "imagerefl", {"imagerefl": {"start_step": 4, "window": [6, 9]}}),
        Algorithm("combined", "DRaFT-K LoRA used only for the last steps (combined generation, ImageReFL)", "draft",
                  {"draft": {"k": 4}}, sampler="combined", sampler_options={"switch_step": 5}),
        Algorithm("dpo", "Diffusion-DPO (Wallace et al. 2024) on on-policy pairs: best vs worst of 4 samples under the "
                  "learned reward", "dpo", {"data": {"source": "on_policy"}, "dpo": {"beta": 1000.0, "candidates": 4}}),
        Algorithm("tpo", "timestep-segment DPO (AlignHuman 2025): a LoRA for the early steps trained on pairs labelled "
                  "by the oracle's layout, one for the late steps on its appearance; sampled with the routed sampler",
                  "tpo", {"reward": "shapes-oracle", "data": {"source": "on_policy"},
                          "tpo": {"beta": 1000.0, "candidates": 4, "per_segment": TPO_SEGMENTS}},
                  sampler="segments"),
        Algorithm("grpo", "GRPO (Flow-GRPO 2025): PPO-clip over SDE rollouts, 2 prompts x 8 images per step, the "
                  "oracle as a rule-based reward (recipes/shapes_oracle_grpo.yaml)", "grpo", GRPO_OVERRIDES),
        Algorithm("smart-grpo", "Smart-GRPO (2025): GRPO whose rollouts start from each prompt's searched noise "
                  "distribution (2 rounds of 8 one-step decodes)", "smart-grpo",
                  _merge(GRPO_OVERRIDES, {"search": {"rounds": 2, "candidates": 8, "keep": 2}})),
        Algorithm("nft", "DiffusionNFT (Zheng et al. 2025): the flow-matching loss on the old policy's ODE samples, "
                  "contrasting implicit positive and negative policies; 4 prompts x 8 images per step, the oracle as "
                  "the reward (recipes/shapes_oracle_nft.yaml)", "nft", NFT_OVERRIDES),
    )
}  # fmt: skip
# Edit alignment: the Shapes edit model, the learned edit reward, judged by the oracle's edit judgement.
EDIT_ALGORITHM = Algorithm(
    "edit-refl", "ReFL on the Shapes edit model with the learned edit reward (source images + instructions)", "refl",
    {"refl": {"window": [4, 8]}},
)  # fmt: skip
DEFAULT_ALGORITHM = "best-of-n"


def algorithm_names() -> tuple[str, ...]:
    return (*ALGORITHMS, EDIT_ALGORITHM.name, "compare")


def check_algorithm(name: str) -> Algorithm:
    """The method, or a one-line ValueError."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if name == EDIT_ALGORITHM.name:
        return EDIT_ALGORITHM
    raise ValueError(f"unknown --algo {name!r}; choose one of {', '.join(algorithm_names())}")


__all__ = ["ALGORITHMS", "COMMON", "DEFAULT_ALGORITHM", "EDIT_ALGORITHM", "GRPO_OVERRIDES", "NFT_OVERRIDES", "TPO_SEGMENTS",
           "TRAIN_REWARD", "Algorithm", "algorithm_names", "check_algorithm"]
