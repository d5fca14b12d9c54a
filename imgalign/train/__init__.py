"""Trainers: one readable recipe per method family, on small shared components.

* :mod:`imgalign.train.reward_backprop` — ReFL, DRaFT(-K/-LV), AlignProp, ImageReFL;
* :mod:`imgalign.train.config` — typed dataclass configs, YAML recipes, ``key=value`` overrides;
* :mod:`imgalign.train.checkpoint` — atomic, rotated checkpoints and exact resume;
* :mod:`imgalign.train.loop` — accelerator, per-step seeding, the guarded optimizer step, logging;
* :mod:`imgalign.train.data` — step-addressed prompt and image/caption data;
* :mod:`imgalign.train.forward_process` — noising a clean latent to a schedule step, and its target.

Submodules import torch/diffusers; import them directly (``from imgalign.train import reward_backprop``).
"""
