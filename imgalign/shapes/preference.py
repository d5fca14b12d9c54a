"""The Shapes preference reward: ShapesCLIP fine-tuned on pairs judged by simulated annotators.

Human preference data (Pick-a-Pic, HPD, ImageRewardDB) are pairs of *generated* images of one
prompt with a rater's choice, noisy and with ties. Here the raters are simulated: each rater
sees the oracle's utilities of the two images plus Gaussian noise (Thurstone's case V, one
draw per rater and image) and calls a tie when the noisy utilities are closer than a
threshold, the way real raters do for near-identical images. Two aspects are rated, as in
multi-head rewards such as EditReward's (instruction following, quality):

* ``prompt``: prompt following, the mean of the oracle's six attribute accuracies;
* ``quality``: the oracle's image-quality aspect (clean edges, pure palette, no noise).

The overall label comes from their mean. Images are four samples per prompt from the shipped
T2I model at several guidance scales (so that both sides are in the distribution alignment
sees) and, for a quarter of the prompts, the exact render of the prompt's scene. Prompts
(:func:`preference_prompts`) are training captions plus held-out-kind prompts of
``shapes-heldout-align``, never the ``shapes-heldout-eval`` prompts the demo is judged on.

The reward is trained with ``imgalign train-reward`` (:mod:`imgalign.train.reward_model`):
every ShapesCLIP weight plus a new two-aspect head, the Rao-Kupper loss for ties. It loads
with ``rewards.load("shapes-preference")``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

ASPECTS = ("prompt", "quality")
GUIDANCE_SCALES = (1.5, 3.0, 5.0)


def utilities(judgement) -> dict[str, float]:
    """The oracle's utilities: the rated aspects first, then every attribute (all in [0, 1])."""
    from .oracle import ATTRIBUTES

    return {"prompt": judgement.attribute_mean, "quality": float(judgement.quality), "overall": float(judgement.overall),
            **{a: float(getattr(judgement, a)) for a in ATTRIBUTES}}  # fmt: skip


def simulated_label(u_a: float, u_b: float, rng: np.random.Generator, noise: float, tie: float) -> str:
    """One rater's call: ``"A"``, ``"B"`` or ``"tie"`` from noisy utilities (Thurstone case V)."""
    d = (u_a + noise * rng.standard_normal()) - (u_b + noise * rng.standard_normal())
    return "tie" if abs(d) < tie else ("A" if d > 0 else "B")


def make_preference_data(
    out_dir: str | Path,
    prompts: list[str],
    *,
    samples_per_prompt: int = 4,
    render_fraction: float = 0.25,
    num_steps: int = 10,
    noise: float = 0.05,
    tie: float = 0.03,
    seed: int = 0,
    device: str = "cpu",
    pipeline: str | None = None,
) -> Path:
    """Sample, judge and pair; writes ``images/*.png`` and ``pairs.jsonl``; returns the JSONL path.

    Every pair of candidates of one prompt becomes a record with the overall label, the
    per-aspect ``labels`` and every oracle utility (for analysis and other aspects).
    """
    from tqdm.auto import tqdm

    import pipelines

    from ..images import save_png
    from .manifest import WEIGHTS_DIR
    from .oracle import judge
    from .world import parse_caption, render

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompts = list(prompts)
    adapter = pipelines.load(pipeline or str(WEIGHTS_DIR / "t2i"), dtype=torch.float32, device=device)
    records = []
    batch = 32
    for start in tqdm(range(0, len(prompts), batch), desc="preference data", unit="batch"):
        chunk = prompts[start : start + batch]
        candidates = [[] for _ in chunk]
        for k in range(samples_per_prompt):
            guidance = float(GUIDANCE_SCALES[(start // batch + k) % len(GUIDANCE_SCALES)])
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + (start + i) * 16 + k) for i in range(len(chunk))]
            with torch.no_grad():
                images = adapter.sample(chunk, num_steps=num_steps, guidance_scale=guidance, generator=generators)
            for i in range(len(chunk)):
                candidates[i].append((images[i].float().cpu(), f"sample g={guidance}"))
        for i, prompt in enumerate(chunk):
            if rng.random() < render_fraction:
                rendered = torch.from_numpy(render(parse_caption(prompt))).permute(2, 0, 1).float() / 255
                candidates[i].append((rendered, "render"))
        flat = [(i, img, kind) for i, cands in enumerate(candidates) for img, kind in cands]
        judgements = judge(torch.stack([img for _, img, _ in flat]), [chunk[i] for i, _, _ in flat])
        judged: list[list[tuple[str, str, dict]]] = [[] for _ in chunk]  # per prompt: (file, kind, utilities)
        for n, ((i, img, kind), j) in enumerate(zip(flat, judgements)):
            name = f"images/{start + i:05d}_{n:03d}.png"
            save_png(img, out / name)
            judged[i].append((name, kind, utilities(j)))
        for prompt, mine in zip(chunk, judged):
            for (name_a, kind_a, u_a), (name_b, kind_b, u_b) in itertools.combinations(mine, 2):
                labels = {asp: simulated_label(u_a[asp], u_b[asp], rng, noise, tie) for asp in ASPECTS}
                mean_a, mean_b = (np.mean([u[a] for a in ASPECTS]) for u in (u_a, u_b))
                records.append({
                    "prompt": prompt, "image_a": name_a, "image_b": name_b,
                    "label": simulated_label(mean_a, mean_b, rng, noise, tie), "labels": labels,
                    "kinds": [kind_a, kind_b], "utility_a": u_a, "utility_b": u_b,
                })  # fmt: skip
    return write_pairs(out / "pairs.jsonl", records)


def write_pairs(path: Path, records: list[dict]) -> Path:
    """Preference records as JSON lines (the format ``imgalign train-reward`` reads)."""
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def preference_prompts(num_train: int = 400, num_align: int = 160) -> tuple[list[str], list[str]]:
    """(training prompts, validation prompts): disjoint, and disjoint from ``shapes-heldout-eval``."""
    from ..prompt_sets import prompt_set

    align = prompt_set("shapes-heldout-align")
    return prompt_set("shapes-train")[:num_train] + align[:num_align], align[num_align:]


def training_config(train: str, val: str | None, out_dir: str, *, steps: int = 600, seed: int = 0) -> dict:
    """The ``imgalign train-reward`` config that builds the shipped reward (see module doc)."""
    return {
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"reward": {"name": "shapes-clip"}, "mode": "full", "new_head": True, "aspects": list(ASPECTS),
                  "head_hidden": 128},
        "loss": {"kind": "rao-kupper", "theta": 1.5},
        "optim": {"lr": 2e-4, "warmup_steps": 20, "weight_decay": 0.01},
        "train": {"batch_size": 32, "max_steps": steps, "seed": seed, "checkpoint_every": 200, "report_to": []},
        "validation": {"every": 100},
        "output_dir": out_dir,
    }  # fmt: skip


def shapes_preference(checkpoint: str | None = None):
    """The shipped Shapes preference reward (``rewards.load("shapes-preference")``)."""
    from .rewards import load_shipped_reward

    return load_shipped_reward("preference", "shapes-preference", checkpoint)
