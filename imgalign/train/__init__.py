"""Trainers: one run skeleton, a method registry, and one readable recipe per method family.

* :mod:`imgalign.train.registry` — the method table: ``imgalign train METHOD`` dispatches
  through it; :func:`register_method` adds a method;
* :mod:`imgalign.train.run` — the run skeleton: setup, the micro-step loop around a method's
  step, the guarded optimizer step, metrics, validation, checkpoints, exact resume, outputs;
* :mod:`imgalign.train.pipeline` — what every trainer of a diffusion pipeline sets up
  (adapter, LoRA, reward, data) and its validation grid and saved LoRA/pipeline;
* recipes: :mod:`imgalign.train.reward_backprop` (ReFL, DRaFT(-K/-LV), AlignProp, ImageReFL),
  :mod:`imgalign.train.reward_model` (reward models on preference pairs);
* components: :mod:`~imgalign.train.config` (typed configs, YAML recipes, ``key=value``
  overrides), :mod:`~imgalign.train.checkpoint` (atomic, rotated checkpoints),
  :mod:`~imgalign.train.loop` (accelerator, per-step seeding, the guarded optimizer step,
  logging), :mod:`~imgalign.train.data` (step-addressed data),
  :mod:`~imgalign.train.forward_process` (noising a clean latent to a schedule step).

The registry imports no torch (so ``imgalign train --help`` is quick); the other submodules
do: import them directly (``from imgalign.train.run import train``).
"""

from .registry import Method, available_methods, get_method, load_method_config, register_method

__all__ = ["Method", "available_methods", "get_method", "load_method_config", "register_method"]
