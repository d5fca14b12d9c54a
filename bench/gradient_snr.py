"""Figure: how much of an online-RL step's gradient is signal, at the batch a recipe uses.

An optimizer step follows the gradient of one rollout batch. If ``g = mu + noise`` with the
noise's variance falling as 1/B in the batch size B, two independent batches' gradients at
the same weights have an expected cosine of about ``rho / (1 + rho)``, where
``rho = |mu|^2 / E|noise|^2`` is the batch's signal-to-noise ratio (in the high-dimensional
limit). So the mean pairwise cosine of K gradients taken at *fixed* weights measures rho, and
``B / rho`` is the batch at which signal and noise would be equal. A second estimate with no
1/B assumption inside the batch: the cosine between the means of two disjoint halves of the K
gradients, whose expectation is ``(K/2) rho / (1 + (K/2) rho)``.

The run is the real method (``imgalign.train.run.train``, any online method: ``grpo``,
``smart-grpo``, ``nft``, ``rwr rwr.mode=awm``) with the learning rate at 1e-12, so every step
rolls out fresh prompts and noise from the same weights; the trainable gradients are copied
just before each optimizer step. No speed is measured, so the machine's load does not matter.

    python bench/gradient_snr.py --config recipes/shapes_oracle_grpo.yaml --rollouts 8
    python bench/gradient_snr.py --config recipes/shapes_oracle_nft.yaml --rollouts 8
    python bench/gradient_snr.py --config recipes/shapes_oracle_grpo.yaml --rollouts 4 train.batch_size=2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from common import ROOT, write_json  # noqa: I001


def pairwise_cosines(grads: list[torch.Tensor]) -> list[float]:
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]


def jackknife_se(grads: list[torch.Tensor]) -> float | None:
    """Standard error of the mean pairwise cosine, leaving one rollout out at a time (pairs share rollouts)."""
    k = len(grads)
    if k < 3:
        return None
    leave_one_out = [statistics.fmean(pairwise_cosines(grads[:i] + grads[i + 1 :])) for i in range(k)]
    mean = statistics.fmean(leave_one_out)
    return ((k - 1) / k * sum((v - mean) ** 2 for v in leave_one_out)) ** 0.5


def snr_from_cosine(cosine: float) -> float:
    """rho from E[cos] = rho / (1 + rho); 0 when the cosine is not positive."""
    return max(cosine, 0.0) / (1.0 - cosine) if cosine < 1 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a training recipe (YAML)")
    parser.add_argument("--rollouts", type=int, default=8, help="independent rollout batches (K)")
    parser.add_argument("--name", default=None, help="results/gradient_snr_<name>.json (default: the recipe's name)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args()

    from imgalign.train.loop import GradientStep
    from imgalign.train.registry import load_method_config
    from imgalign.train.run import train

    config = Path(args.config) if Path(args.config).is_file() else ROOT / args.config
    root = Path(tempfile.mkdtemp(prefix="bench-snr-"))
    overrides = [*args.overrides, f"output_dir={root / 'run'}", f"train.max_steps={args.rollouts}", "optim.lr=1e-12",
                 "optim.warmup_steps=0", "train.checkpoint_every=0", "validation.num_images=0", "train.report_to=[]",
                 "train.ema_decay=null"]  # fmt: skip
    cfg = load_method_config(yaml.safe_load(config.read_text())["method"], str(config), overrides)
    grads: list[torch.Tensor] = []
    original_step = GradientStep.__call__

    def recording_step(self):
        grads.append(torch.cat([p.grad.detach().float().flatten() if p.grad is not None else
                                torch.zeros(p.numel()) for p in self.params]).cpu())  # fmt: skip
        return original_step(self)

    GradientStep.__call__ = recording_step
    try:
        result = train(cfg)
    finally:
        GradientStep.__call__ = original_step
    cosines = pairwise_cosines(grads)
    mean_cos = statistics.fmean(cosines)
    half = len(grads) // 2
    halves = float(torch.nn.functional.cosine_similarity(torch.stack(grads[:half]).mean(0),
                                                         torch.stack(grads[half: 2 * half]).mean(0), dim=0))  # fmt: skip
    rho = snr_from_cosine(mean_cos)
    rho_halves = snr_from_cosine(halves) / half
    batch = _images_per_step(cfg)
    rewards = [m["reward_mean"] for m in result.metrics if "reward_mean" in m]
    row = {"config": str(args.config), "method": cfg.method, "overrides": args.overrides, "rollouts": len(grads),
           "images_per_rollout": batch, "pairwise_cosine_mean": mean_cos,
           "pairwise_cosine_se": jackknife_se(grads),
           "pairwise_cosine_min": min(cosines), "pairwise_cosine_max": max(cosines), "halves_cosine": halves,
           "snr_per_rollout": rho, "snr_per_rollout_from_halves": rho_halves,
           "images_for_snr_1": batch / rho if rho > 0 else float("inf"),
           "grad_norm_mean": statistics.fmean(float(g.norm()) for g in grads),
           "reward_mean": statistics.fmean(rewards) if rewards else None}  # fmt: skip
    print(f"{cfg.method}: {len(grads)} rollouts of {batch} images at fixed weights")
    se = row["pairwise_cosine_se"]
    print(f"pairwise cosine {mean_cos:+.4f} (jackknife se {'n/a' if se is None else f'{se:.4f}'}; "
          f"min {min(cosines):+.3f}, max {max(cosines):+.3f}); halves {halves:+.4f}")  # fmt: skip
    print(f"signal-to-noise per rollout {rho:.4f} (from the halves {rho_halves:.4f}); "
          f"images for SNR 1: {row['images_for_snr_1']:.0f}")  # fmt: skip
    name = args.name or Path(args.config).stem
    print(write_json(f"gradient_snr_{name}", [row], {"config": str(args.config), "overrides": args.overrides}))


def _images_per_step(cfg) -> int:
    """Images sampled per optimizer step (GRPO and NFT accumulate over one rollout's chunks themselves)."""
    for section in ("grpo", "nft"):
        if hasattr(cfg, section):
            return cfg.train.batch_size * getattr(cfg, section).group_size
    return cfg.train.batch_size * cfg.rwr.candidates * cfg.train.gradient_accumulation_steps


if __name__ == "__main__":
    main()
