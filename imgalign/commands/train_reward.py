"""``imgalign train-reward``: train a reward model on preference pairs (the ``reward`` method).

    imgalign train-reward --config recipes/reward.yaml train.max_steps=500 model.mode=lora lora.rank=16
    imgalign train-reward --config recipes/reward.yaml train.max_steps=800 model.mode=lora lora.rank=16 --resume latest
    accelerate launch --num_processes 4 --mixed_precision bf16 -m imgalign.cli train-reward --config ...

The same as ``imgalign train reward``: the config is
:class:`imgalign.train.reward_model.RewardModelTrainingConfig` (sections ``data``, ``model``,
``lora``, ``loss`` and the shared ``train``, ``optim``, ``validation``); ``key=value``
overrides use dotted keys and YAML values. The trained reward is written to
``<output_dir>/reward`` and loads with ``rewards.load(path)`` (or ``--reward <dir>`` in
``score``, ``filter`` and ``eval-reward``).
"""

from __future__ import annotations

import argparse

from .train import add_run_arguments, run_method

HELP = "Train a reward model (head, LoRA or full) on preference pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return run_method("reward", args)
