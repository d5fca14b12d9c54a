"""The method registry: one table from a method's name to what trains it.

``imgalign train METHOD``, ``imgalign train-reward`` (the method ``reward``), the demo's
``--algo`` and the recipes' ``method:`` all use these names. A :class:`Method` is a config
class, a check of that config, a ``setup`` that builds what the method trains (models,
reward, data) and a ``step`` that turns one micro-batch into a loss: the skeleton in
:mod:`imgalign.train.run` does the rest (accelerate, seeding, the optimizer step,
checkpoints, resume, logging, validation). Adding a method is registering it::

    from imgalign.train import Method, register_method
    register_method(Method("toy", ToyConfig, setup=setup_toy, step=toy_step, help="..."))

Built-in methods are listed here by ``"module:attribute"`` and imported on first use, so
``imgalign train --help`` does not import torch. Other packages can add methods through the
``imgalign.methods`` entry-point group (``name = "package.module:METHOD"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "imgalign.methods"


@dataclass(frozen=True)
class Method:
    """What ``imgalign train NAME`` runs.

    * ``config``: the top-level config dataclass (extends
      :class:`~imgalign.train.config.TrainingConfig`);
    * ``setup(run) -> Trainee``: load what trains and what it needs, once per run;
    * ``step(trainee, micro) -> StepLoss``: SAMPLE / SCORE / the loss of one micro-batch;
    * ``check(cfg)``: errors knowable before any model loads (a one-line ``ValueError``).
    """

    name: str
    config: type
    setup: Callable[[Any], Any]
    step: Callable[[Any, Any], Any]
    check: Callable[[Any], None] | None = None
    help: str = ""


# name -> Method, or "module:attribute" (imported on first use) and its one-line help.
_REGISTRY: dict[str, Method | str] = {}
_HELP: dict[str, str] = {}
_entry_points_read = False


def register_method(method: Method | str, *, name: str | None = None, help: str = "", overwrite: bool = False) -> None:
    """Make ``imgalign train NAME`` run ``method`` (a :class:`Method` or a lazy ``"module:attr"``)."""
    if isinstance(method, Method):
        name, help = method.name, help or method.help
    elif not (isinstance(method, str) and ":" in method and name):
        raise TypeError("register_method takes a Method, or a 'module:attribute' string with name=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"invalid method name {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = method
    _HELP[name] = help


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register_method(ep.value, name=ep.name)


def available_methods() -> dict[str, str]:
    """Registered method names and their one-line help, in registration order."""
    _read_entry_points()
    return dict(_HELP)


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name`` (a one-line ``ValueError`` otherwise)."""
    _read_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}")
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        if not isinstance(entry, Method):
            raise TypeError(f"{module}:{attr} is not an imgalign.train.Method")
        _REGISTRY[name] = entry
        _HELP[name] = _HELP[name] or entry.help
    return entry


def load_method_config(name: str, path: str | None = None, overrides: Sequence[str] = ()) -> Any:
    """The method's config from a recipe and ``key=value`` overrides, checked (one-line errors)."""
    from .config import load_config

    method = get_method(name)
    cfg = load_config(method.config, path, overrides, method=name)
    if method.check is not None:
        method.check(cfg)
    return cfg


for _name, _target, _help in (
    ("refl", "imgalign.train.reward_backprop:REFL",
     "ReFL (Xu et al. 2023): one gradient step at a random late step, x0 -> reward"),
    ("draft", "imgalign.train.reward_backprop:DRAFT",
     "DRaFT-K / DRaFT-LV (Clark et al. 2024), AlignProp truncation (Prabhudesai et al. 2023)"),
    ("imagerefl", "imgalign.train.reward_backprop:IMAGEREFL",
     "ImageReFL (Sorokin et al. 2025): ReFL from real images + denoising loss"),
    ("dpo", "imgalign.train.preference:DPO",
     "Diffusion-DPO (Wallace et al. 2024) / H-DPO (dpo.alpha), on a pairs dataset or on-policy pairs"),
    ("tpo", "imgalign.train.segment_dpo:TPO",
     "timestep-segment DPO (AlignHuman 2025): one LoRA per noise-level segment, each on its own pairs"),
    ("grpo", "imgalign.train.grpo:GRPO",
     "GRPO (Flow-GRPO SDE/CPS, DDPO DDIM-eta): PPO-clip over stochastic rollouts, group advantages, KL"),
    ("smart-grpo", "imgalign.train.grpo:SMART_GRPO",
     "Smart-GRPO (2025): GRPO whose rollouts start from a per-prompt searched noise distribution"),
    ("nft", "imgalign.train.nft:NFT",
     "DiffusionNFT (Zheng et al. 2025): positive/negative flow matching on old-policy samples, any solver"),
    ("kto", "imgalign.train.kto:KTO",
     "Diffusion-KTO (Li et al. 2024): unpaired good/bad labels, from a file or on-policy"),
    ("rwr", "imgalign.train.reward_weighted:RWR",
     "reward-weighted fine-tuning (Lee et al. 2023) and advantage-weighted matching (AWM, 2025)"),
    ("reward", "imgalign.train.reward_model:REWARD_MODEL",
     "a reward model (head, LoRA or full) on preference pairs; also `imgalign train-reward`"),
):  # fmt: skip
    register_method(_target, name=_name, help=_help)
del _name, _target, _help

__all__ = ["ENTRY_POINT_GROUP", "Method", "available_methods", "get_method", "load_method_config", "register_method"]
