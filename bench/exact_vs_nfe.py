"""Figure: held-out exact match against function evaluations, trained online RL beside test-time search.

On the shipped Shapes model, the held-out evaluation prompts (``shapes-heldout-eval``, never
trained on) and fixed seeds, every point is judged by the exact oracle's ``exact`` (every
object of the caption right). The x-axis is the denoiser evaluations spent in total to make
the evaluated images (one image through the denoiser at one step; a CFG pair counts once, as
in ``imgalign.sampling.search`` and ``imgalign.train.grpo.function_evaluations``):

* the base model and every trained model: 10 per image (10-step ODE sampling, CFG 3), plus,
  for a trained model, the training run's ``nfe_total`` at that checkpoint (the training cost
  charged in full to the evaluated images; it amortises over every image the model makes later);
* best-of-N under a guiding reward: ``10 N`` per image, N = 1, 2, 4, ... from one draw of
  ``--best-of`` candidates (:func:`imgalign.shapes.demo.best_of_n_curve`);
* ``noise-search``, ``path-search``, ``speculative``: the demo's settings (about best-of-8's
  80 per image), the evaluations each actually spent.

Training runs are given as output directories (``--run DIR``, any of ``grpo``, ``smart-grpo``,
``nft``, ``rwr``); each of their checkpoints is evaluated (the EMA weights where the run kept
an EMA). Intervals are 95% bootstrap intervals over prompts. The figure goes to ``--plot``;
the numbers to ``bench/out/exact_vs_nfe.json``.

    python bench/exact_vs_nfe.py --quick                                  # < 2 min: 4 prompts, 4 steps, best-of-4
    python bench/exact_vs_nfe.py --run runs/shapes_oracle_grpo --run runs/shapes_oracle_nft --plot docs/exact_vs_nfe.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from common import write_json  # noqa: I001 (puts the checkout on sys.path)


def load_checkpoint_weights(adapter, checkpoint: Path) -> int:
    """Apply a training checkpoint's trainable weights (EMA shadow if saved) to ``adapter``; return its step."""
    from imgalign.train.checkpoint import read_trainable
    from imgalign.train.config import LoraConfig
    from imgalign.train.loop import setup_trainable

    run_cfg = yaml.safe_load((checkpoint.parents[1] / "config.yaml").read_text())
    lora = LoraConfig(**{k: v for k, v in run_cfg.get("lora", {}).items() if k in LoraConfig.__dataclass_fields__})
    params = setup_trainable(adapter, lora)
    saved = read_trainable(checkpoint, params)
    values = [saved[name] for name in params]
    if (checkpoint / "ema.pt").is_file():  # the EMA follows the order of the trainable parameters
        values = torch.load(checkpoint / "ema.pt", weights_only=True)["shadow_params"]
    with torch.no_grad():
        for param, value in zip(params.values(), values, strict=True):
            param.copy_(value)
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


def run_nfe(run: Path) -> dict[int, float]:
    """``nfe_total`` of a run's metrics.jsonl by step."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "nfe_total" in row:
            out[int(row["step"])] = float(row["nfe_total"])
    return out


def exact_point(result, label: str, nfe_per_image: float, extra_nfe: float = 0.0) -> dict:
    from imgalign.evaluation import bootstrap_interval

    per_prompt = result.per_prompt("shapes-oracle/exact")
    lo, hi = bootstrap_interval(per_prompt)
    images = len(result.prompts) * result.images_per_prompt
    return {"label": label, "exact": float(per_prompt.mean()), "ci95": [lo, hi], "nfe_per_image": nfe_per_image,
            "training_nfe": extra_nfe, "nfe_total": nfe_per_image * images + extra_nfe,
            "overall": float(result.per_prompt("shapes-oracle").mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="a training output directory (repeat)")
    parser.add_argument("--guide", action="append", default=None,
                        help="the search samplers' reward (repeat; default shapes-verifier)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--best-of", type=int, default=16)
    parser.add_argument("--search-under", action="append", default=None,
                        help="the guides the three search samplers also run under (repeat; default the first "
                             "--guide; 'none' for best-of-N only)")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    parser.add_argument("--quick", action="store_true", help="4 prompts x 1 seed, 4 steps, best-of-4")
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.images_per_prompt, args.steps, args.best_of = 4, 1, 4, 4

    import rewards
    from imgalign.evaluation import evaluate
    from imgalign.prompt_sets import prompt_set
    from imgalign.sampling import best_candidates, best_of_n_candidates, run_sampler
    from imgalign.shapes.algorithms import ALGORITHMS
    from imgalign.shapes.demo import best_of_n_curve
    from imgalign.shapes.t2i import load_shipped_pipeline

    prompts = prompt_set("shapes-heldout-eval")[: args.num_prompts]
    oracle = rewards.load("shapes-oracle")
    sampling = {"num_steps": args.steps, "guidance_scale": 3.0}
    k = args.images_per_prompt
    images = len(prompts) * k

    def evaluate_with(sample):
        return evaluate(sample, prompts, {"shapes-oracle": oracle}, images_per_prompt=k, seed=args.seed,
                        progress=False, keep_images=False)  # fmt: skip

    def ode(adapter):
        return lambda ps, gens: run_sampler("ode", adapter, ps, generator=gens, **sampling)

    points: list[dict] = []
    base = load_shipped_pipeline("t2i")
    points.append({**exact_point(evaluate_with(ode(base)), "base", args.steps), "kind": "base"})
    print(f"base: exact {points[-1]['exact']:.3f}", flush=True)
    for guide in args.guide or ["shapes-verifier"]:
        reward = rewards.load(guide)
        kept = []

        def best_of(ps, gens, reward=reward, kept=kept):
            candidates, scores = best_of_n_candidates(base, ps, reward=reward, n=args.best_of, generator=gens, **sampling)
            kept.append((candidates, scores, ps))
            return best_candidates(candidates, scores)

        evaluate_with(best_of)
        curve = best_of_n_curve(torch.cat([c for c, _, _ in kept]), torch.cat([s for _, s, _ in kept]),
                                [p for _, _, ps in kept for p in ps])  # fmt: skip
        for n, exact in zip(curve["n"], curve["oracle/exact"], strict=True):
            points.append({"label": f"best-of-{int(n)} ({guide})", "kind": "best-of-n", "guide": guide, "n": n,
                           "exact": exact, "ci95": None, "nfe_per_image": n * args.steps, "training_nfe": 0.0,
                           "nfe_total": n * args.steps * images})  # fmt: skip
        print(f"best-of-N under {guide}: " + ", ".join(f"{int(n)}: {e:.3f}" for n, e in
                                                         zip(curve["n"], curve["oracle/exact"], strict=True)), flush=True)  # fmt: skip
        if guide not in (args.search_under or [(args.guide or ["shapes-verifier"])[0]]):
            continue
        for name in ("noise-search", "path-search", "speculative"):
            algo, spent = ALGORITHMS[name], []

            def search(ps, gens, algo=algo, spent=spent):
                out = run_sampler(algo.sampler, base, ps, generator=gens, reward=reward, return_output=True,
                                  **algo.sampler_options, **sampling)  # fmt: skip
                spent.extend(out.nfe)
                return out.images

            result = evaluate_with(search)
            points.append({**exact_point(result, f"{name} ({guide})", float(np.mean(spent))), "kind": name,
                           "guide": guide})  # fmt: skip
            print(f"{name} under {guide}: exact {points[-1]['exact']:.3f} at {np.mean(spent):.0f} per image", flush=True)
    for run in map(Path, args.run):
        nfe = run_nfe(run)
        method = yaml.safe_load((run / "config.yaml").read_text())["method"]
        for checkpoint in sorted((run / "checkpoints").glob("checkpoint-*")):
            adapter = load_shipped_pipeline("t2i")
            step = load_checkpoint_weights(adapter, checkpoint)
            result = evaluate_with(ode(adapter))
            points.append({**exact_point(result, f"{method} step {step}", args.steps, nfe.get(step, 0.0)),
                           "kind": method, "run": str(run), "step": step})  # fmt: skip
            print(f"{run.name} step {step}: exact {points[-1]['exact']:.3f}, training nfe {nfe.get(step, 0):.0f}",
                  flush=True)  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k != "plot"}
    print(write_json("exact_vs_nfe", points, settings))
    if args.plot:
        plot(points, Path(args.plot), images)


def plot(points: list[dict], path: Path, images: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    base = next(p for p in points if p["kind"] == "base")
    ax.axhline(100 * base["exact"], color="grey", lw=1, ls="--", label="base model (10 steps)")
    markers = {"noise-search": "^", "path-search": "s", "speculative": "D"}
    for guide in sorted({p.get("guide") for p in points if p.get("guide")}):
        curve = [p for p in points if p["kind"] == "best-of-n" and p["guide"] == guide]
        ax.plot([p["nfe_total"] for p in curve], [100 * p["exact"] for p in curve], "o-", label=f"best-of-N, {guide}")
        for p in points:
            if p["kind"] in markers and p["guide"] == guide:
                ax.errorbar(p["nfe_total"], 100 * p["exact"], yerr=_yerr(p), fmt=markers[p["kind"]], capsize=3,
                            label=f"{p['kind']}, {guide}")  # fmt: skip
    for run in sorted({p["run"] for p in points if "run" in p}):
        curve = [base] + sorted((p for p in points if p.get("run") == run), key=lambda p: p["step"])
        label = f"{curve[-1]['kind']} ({Path(run).name})"
        ax.errorbar([p["nfe_total"] for p in curve], [100 * p["exact"] for p in curve],
                    yerr=np.array([_yerr(p)[:, 0] for p in curve]).T, fmt="x-", capsize=3, label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"denoiser evaluations in total for the {images} evaluated images (training included)")
    ax.set_ylabel("held-out exact match (%)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _yerr(point: dict) -> np.ndarray:
    if not point.get("ci95"):
        return np.zeros((2, 1))
    lo, hi = point["ci95"]
    return np.array([[100 * (point["exact"] - lo)], [100 * (hi - point["exact"])]])


if __name__ == "__main__":
    main()
