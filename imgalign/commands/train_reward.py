"""``imgalign train-reward``: train a reward model on preference pairs.

    imgalign train-reward --config recipes/reward.yaml optim.max_steps=500 model.mode=lora
    accelerate launch --num_processes 4 --mixed_precision bf16 -m imgalign.cli train-reward --config ...

The config mirrors :class:`rewards.training.RewardTrainingConfig` (sections ``data``,
``model``, ``loss``, ``optim``, ``run``); ``key=value`` overrides use dotted keys and YAML
values. The trained reward is written to ``<run.output_dir>/reward`` and loads with
``rewards.load(path)`` (or ``--reward <dir>`` in ``score``, ``filter`` and ``eval-reward``).
Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse

from imgalign.commands import CommandError

HELP = "Train a reward model (head, LoRA or full) on preference pairs."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4")


def run(args) -> int:
    from imgalign.train.config import ConfigError, load_config
    from rewards.training import RewardTrainingConfig, train_reward

    try:
        cfg = load_config(RewardTrainingConfig, args.config, args.overrides)
    except ConfigError as err:
        raise CommandError(str(err)) from None
    out = train_reward(cfg)
    print(f"trained reward written to {out} (load it with rewards.load({str(out)!r}))")
    return 0
