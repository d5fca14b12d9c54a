"""Figure: where a GRPO step's time goes -- rollout, scoring, update -- against plain sampling.

One GRPO optimizer step (``imgalign.train.grpo``) is a rollout of ``prompts x group`` images
through the adapter's stochastic step with log-probs, the reward on the decoded images, and
the update: for every trained step of every chunk, the policy forward + backward of the stored
transition and (``beta > 0``) a reference forward. The baseline, measured in the same process
on the same images, is the pipeline's own deterministic sampling loop (``adapter.sample``):
``rollout / sampling`` is the cost of stochastic steps with log-probs, ``update / rollout`` the
cost of learning from what was sampled (Flow-GRPO trains every sampled step; a window or
``timestep_fraction`` cuts it).

The run is the real method (``imgalign.train.run.train``) with phases timed by wrapping
``grpo.rollout`` and ``grpo.score``; the update is the step's wall time minus the two. Steps
after the first (warm-up) are averaged.

    python bench/grpo_epoch.py                              # CPU: the shipped Shapes model, 32^2
    python bench/grpo_epoch.py --pipeline sd15-tiny         # CPU: tiny SD1.5 (DDPO's DDIM-eta step)
    python bench/grpo_epoch.py --pipeline full-sd3 --size 512 --group 8   # GPU: SD3.5-medium's architecture, random weights
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"


def build(pipeline: str, root: Path) -> tuple[str, str]:
    """(pipeline path or name, reward name)."""
    import rewards
    from rewards import Reward, RewardInfo

    class Bright(Reward):
        info = RewardInfo(name="bench-bright", inputs=("images",), differentiable=False)

        def _score(self, images, prompts=None, **_):
            return images.mean(dim=(1, 2, 3))

    rewards.register("bench-bright", lambda **kw: Bright(), overwrite=True)
    if pipeline == "shapes":
        return "shapes", "shapes-oracle"
    from pipelines.architectures import build_pipeline

    family, size = ("sd15", "tiny") if pipeline == "sd15-tiny" else (pipeline.removeprefix("full-"), "full")
    path = root / pipeline
    build_pipeline(family, size, seed=0).save_pretrained(path)
    return str(path), "bench-bright"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="shapes", help="shapes | sd15-tiny | full-sd3 | full-sd15 | full-flux")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps to time (the first is warm-up)")
    parser.add_argument("--beta", type=float, default=0.01)
    parser.add_argument("--timestep-fraction", type=float, default=1.0)
    args = parser.parse_args()

    from imgalign.prompt_sets import prompt_set
    from imgalign.train import grpo
    from imgalign.train.registry import load_method_config
    from imgalign.train.run import train

    root = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    pipe, reward = build(args.pipeline, root)
    prompts = prompt_set("shapes-heldout-align")[: args.prompts * args.train_steps] if pipe == "shapes" else \
        [f"a photo of object {i}" for i in range(args.prompts * args.train_steps)]  # fmt: skip
    cuda = torch.cuda.is_available()
    overrides = [f"pipeline={pipe}", f"reward={reward}", f"output_dir={root / 'run'}", f"data.prompts={json.dumps(prompts)}",
                 f"train.max_steps={args.train_steps}", f"train.batch_size={args.prompts}", "train.report_to=[]",
                 f"train.mixed_precision={'bf16' if cuda else 'no'}", f"train.gradient_checkpointing={str(cuda).lower()}",
                 f"sampling.num_steps={args.steps}", f"sampling.height={args.size}", f"sampling.width={args.size}",
                 "sampling.guidance_scale=3.0", "validation.num_images=0", f"grpo.group_size={args.group}",
                 f"grpo.beta={args.beta}", f"grpo.timestep_fraction={args.timestep_fraction}"]  # fmt: skip
    timings: dict[str, list[float]] = {"rollout": [], "score": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
            return out

        return wrapper

    grpo.score = timed("score", grpo.score)
    original_rollout = grpo.rollout
    grpo.rollout = timed("rollout", original_rollout)
    result = train(load_method_config("grpo", None, overrides))
    steps = [m["step_time_s"] for m in result.metrics if "step_time_s" in m][1:]
    rollout_s = timings["rollout"][1:]
    score_s = timings["score"][1:]
    n = len(steps)
    step = sum(steps) / n
    roll = sum(rollout_s) / n - sum(score_s) / n  # rollout() includes scoring
    scr = sum(score_s) / n
    update = step - roll - scr

    # the baseline: the pipeline's own ODE loop on the same number of images, same process
    import pipelines

    adapter = pipelines.load(pipe, device="cuda" if cuda else "cpu")
    images = args.prompts * args.group
    sample_times = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        adapter.sample(prompts[: args.prompts] * args.group, num_steps=args.steps, guidance_scale=3.0,
                       height=args.size, width=args.size)  # fmt: skip
        if cuda:
            torch.cuda.synchronize()
        sample_times.append(time.perf_counter() - start)
    sampling = min(sample_times)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    row = {"pipeline": args.pipeline, "device": device, "images_per_step": images, "sampling_steps": args.steps,
           "trained_steps": max(1, round(args.timestep_fraction * args.steps)), "beta": args.beta,
           "step_s": step, "rollout_s": roll, "score_s": scr, "update_s": update, "ode_sampling_s": sampling,
           "rollout_over_sampling": roll / sampling, "update_over_rollout": update / roll,
           "split": {k: v / step for k, v in (("rollout", roll), ("score", scr), ("update", update))}}  # fmt: skip
    print(f"{'phase':<10} {'seconds':>8} {'share':>6}")
    for key in ("rollout", "score", "update"):
        print(f"{key:<10} {row[key + '_s']:8.2f} {row['split'][key]:6.1%}")
    print(f"rollout / ODE sampling of the same images: {row['rollout_over_sampling']:.2f}x; "
          f"update / rollout: {row['update_over_rollout']:.2f}x  ({device})")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / f"grpo_epoch_{args.pipeline}.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
