"""Figure: reward gained per function evaluation by the test-time search samplers, at equal budgets.

On the shipped Shapes model (32x32 pixel-space flow model, guidance 3), held-out prompts and
fixed seeds, every sampler gets a budget of ``B x steps`` function evaluations per image
(``imgalign.sampling.search``: one denoiser prediction for one image at one step) and is set
to the largest configuration that fits it:

* ``best-of-n``: ``n = B``;
* ``speculative``: the most candidates whose cost fits, halved before steps T/3 and 2T/3;
* ``noise-search`` (``smart``, Smart-GRPO): 3 rounds of ``n`` one-step candidates + one sample;
* ``zero-order`` (noise-search ``method="zero-order"``): a pivot + 1 round (2 from 5x) of ``n`` full samples;
* ``path-search``: the most paths (2 branches each, the default rounds) whose cost fits.

Each picks by the guiding reward (``shapes-verifier``, the learned per-object verifier the
demo's best-of-N uses); every pick is also judged by the exact oracle (``shapes-oracle``),
so a search that only games the verifier shows a verifier gain without an oracle gain.
Columns: the mean guiding reward and oracle score of the picks, the function evaluations
actually spent per image, and the gain over plain sampling (the same seeds, one sample)
per 100 extra function evaluations. The baseline (plain sampling) runs in the same process.

    python bench/search_samplers.py --quick     # < 1 min on 2 idle CPU cores: 2 prompts, 4 steps, budgets 4x and 6x
    python bench/search_samplers.py             # 16 prompts, 10 steps, budgets 4x, 8x, 16x
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from common import print_table, write_json  # noqa: I001

import pipelines
import rewards
from imgalign.prompt_sets import prompt_set
from imgalign.sampling import run_sampler
from imgalign.sampling.search import path_plan, prune_steps

GUIDING, ORACLE = "shapes-verifier", "shapes-oracle"


def speculative_cost(n: int, steps: int, prune_at: list[int], fraction: float) -> int:
    cost, alive, last = 0, n, 0
    for s in prune_at:
        cost += alive * (s - last)
        alive -= min(math.floor(fraction * alive), alive - 1)
        last = s
    return cost + alive * (steps - last)


def path_cost(n: int, branches: int, steps: int) -> int:
    start, rounds = path_plan(steps)
    return n * start + n * branches * sum(k - j for _, j, k in rounds)


def configurations(budget: int, steps: int) -> dict[str, tuple[str, int, dict]]:
    """Sampler name, n and search options of each method for ``budget`` evaluations per image."""
    prune = prune_steps(steps, None)
    spec_n = max(n for n in range(1, 8 * budget) if speculative_cost(n, steps, prune, 0.5) <= budget)
    path_n = max([n for n in range(1, budget) if path_cost(n, 2, steps) <= budget] or [1])
    zo_rounds = 2 if budget >= 5 * steps else 1
    return {
        "best-of-n": ("best-of-n", budget // steps, {}),
        "speculative": ("speculative", spec_n, {"prune_fraction": 0.5}),
        "noise-search": ("noise-search", max(1, (budget - steps) // 3), {"method": "smart", "rounds": 3}),
        "zero-order": ("noise-search", max(1, (budget // steps - 1) // zo_rounds), {"method": "zero-order",
                                                                                 "rounds": zo_rounds}),
        "path-search": ("path-search", path_n, {"branches": 2}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 prompts, 4 steps, budgets 4x and 6x (< 1 min on CPU)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--budgets", default=None, help="comma-separated multiples of --steps (default 4,8,16)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON directory (default bench/out)")
    args = parser.parse_args()
    num_prompts = args.prompts or (2 if args.quick else 16)
    steps = args.steps or (4 if args.quick else 10)
    multiples = [int(b) for b in (args.budgets or ("4,6" if args.quick else "4,8,16")).split(",")]

    adapter = pipelines.load("shapes", dtype=torch.float32, device=args.device)
    guiding, oracle = rewards.load(GUIDING), rewards.load(ORACLE)
    prompts = prompt_set("shapes-heldout-eval")[:num_prompts]
    common = {"num_steps": steps, "guidance_scale": 3.0}

    def generators() -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(args.seed + i) for i in range(num_prompts)]

    def judge(images: torch.Tensor) -> tuple[float, float]:
        return (float(guiding.score_batched(images, prompts).mean()), float(oracle.score_batched(images, prompts).mean()))

    start = time.time()
    plain = run_sampler("ode", adapter, prompts, generator=generators(), **common)
    base_reward, base_oracle = judge(plain)
    rows = [{"method": "plain", "budget": steps, "n": 1, "nfe": steps, GUIDING: base_reward, ORACLE: base_oracle,
             "seconds": round(time.time() - start, 2)}]  # fmt: skip
    for multiple in multiples:
        budget = multiple * steps
        for method, (sampler, n, options) in configurations(budget, steps).items():
            t0 = time.time()
            out = run_sampler(sampler, adapter, prompts, reward=guiding, n=n, search=options or None,
                              generator=generators(), return_output=True, **common)  # fmt: skip
            reward_value, oracle_value = judge(out.images)
            nfe = sum(out.nfe) / len(out.nfe)
            extra = max(nfe - steps, 1e-9)
            rows.append({
                "method": method, "budget": budget, "n": n, "nfe": nfe, GUIDING: reward_value, ORACLE: oracle_value,
                "reward_gain_per_100_nfe": 100 * (reward_value - base_reward) / extra,
                "oracle_gain_per_100_nfe": 100 * (oracle_value - base_oracle) / extra,
                "seconds": round(time.time() - t0, 2),
            })  # fmt: skip
    columns = ["method", "budget", "n", "nfe", GUIDING, ORACLE, "reward_gain_per_100_nfe", "oracle_gain_per_100_nfe",
               "seconds"]  # fmt: skip
    print(f"Shapes T2I, {num_prompts} held-out prompts, {steps} steps, guidance 3; picks by {GUIDING}, judged by {ORACLE}")
    print_table(rows, columns)
    settings = {"prompts": num_prompts, "steps": steps, "budgets": [m * steps for m in multiples], "seed": args.seed,
                "guiding_reward": GUIDING, "judge": ORACLE, "device": args.device, "quick": args.quick}  # fmt: skip
    path = write_json("search_samplers", rows, settings, args.out)
    print(f"wrote {path} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
