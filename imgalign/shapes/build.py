"""``imgalign shapes build``: regenerate every shipped Shapes model from a seed, in order.

Stages (each writes one directory under the output and its manifest entry: sha256 of every
file, the command, and the stage's held-out metrics):

1. ``t2i``: the text-to-image model (:mod:`imgalign.shapes.t2i`);
2. ``clip``: ShapesCLIP (:mod:`imgalign.shapes.clip`);
3. ``verifier``: T2I samples read by the oracle plus rendered scenes, then the per-object
   verifier reward (:mod:`imgalign.shapes.verifier`);
4. ``preference``: pairs of T2I samples judged by simulated raters, then the two-aspect
   preference reward (:mod:`imgalign.shapes.preference`);
5. ``edit``: the instruction-edit model, initialised from the T2I model (:mod:`imgalign.shapes.edit`);
6. ``edit-reward``: edit preference pairs (renders and edit-model samples), then the edit
   reward (:mod:`imgalign.shapes.edit_reward`).

Later stages use the models the earlier ones wrote to the same output directory (each
stage's time is recorded in the manifest). ``quick=True`` runs every stage with a handful of
steps (a smoke test of the pipeline of stages, not usable weights).
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STAGES = ("t2i", "clip", "verifier", "preference", "edit", "edit-reward")


@dataclass
class BuildSettings:
    out: Path
    seed: int = 0
    device: str = "cpu"
    quick: bool = False

    def steps(self, full: int) -> int:
        return 2 if self.quick else full

    def count(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    @property
    def shipped(self) -> bool:
        from .manifest import WEIGHTS_DIR

        return self.out.resolve() == WEIGHTS_DIR.resolve()

    def clip_options(self) -> dict:
        """How a saved reward refers to this build's ShapesCLIP (nothing for the shipped one)."""
        return {} if self.shipped else {"checkpoint": str((self.out / "clip").resolve())}


def _train_reward(config: dict) -> tuple[Path, dict]:
    """``imgalign train-reward`` with ``config``: the reward's directory and its last validation."""
    from ..train.config import from_dict
    from ..train.reward_model import RewardModelTrainingConfig
    from ..train.run import train

    reward_dir = train(from_dict(RewardModelTrainingConfig, config)).weights_dir
    lines = (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    last = [json.loads(line) for line in lines if "val_accuracy" in line][-1]
    metrics = {k.removeprefix("val_"): v for k, v in last.items() if k.startswith("val_")}
    return reward_dir, metrics


def _replace_dir(source: Path, target: Path) -> None:
    """Copy a finished directory into place atomically (the old one stays until the swap)."""
    import shutil

    from ..io import atomic_directory

    with atomic_directory(target) as tmp:
        for path in source.iterdir():
            shutil.copy2(path, tmp / path.name)


def build_t2i(s: BuildSettings, log) -> dict:
    from .t2i import evaluate_t2i, train_t2i

    train_t2i(s.out / "t2i", steps=s.steps(1500), seed=s.seed, device=s.device)
    return evaluate_t2i(s.out / "t2i", n_prompts=s.count(300, 4), device=s.device)


def build_clip(s: BuildSettings, log) -> dict:
    from .clip import evaluate_shapes_clip, shapes_clip, train_shapes_clip

    train_shapes_clip(s.out / "clip", steps=s.steps(2000), seed=s.seed, device=s.device)
    return evaluate_shapes_clip(shapes_clip(str(s.out / "clip")), n=s.count(500, 8))


def build_verifier(s: BuildSettings, log) -> dict:
    from .verifier import evaluate_verifier, sample_pool, train_verifier, verifier_pool_prompts

    prompts = verifier_pool_prompts()
    images, objects = sample_pool(prompts[: s.count(len(prompts), 8)], seed=s.seed, pipeline_dir=s.out / "t2i")
    train_verifier(s.out / "verifier", images, objects, steps=s.steps(4000), seed=s.seed, device=s.device)
    return evaluate_verifier(s.out / "verifier", pipeline_dir=s.out / "t2i", n_prompts=s.count(100, 4))


def build_preference(s: BuildSettings, log) -> dict:
    from .preference import make_preference_data, preference_prompts, training_config

    with tempfile.TemporaryDirectory(prefix="shapes-preference-") as tmp:
        work = Path(tmp)
        common = {"pipeline": str(s.out / "t2i"), "device": s.device}
        train_prompts, val_prompts = preference_prompts()
        if s.quick:
            train_prompts, val_prompts = train_prompts[:4], val_prompts[:4]
        train = make_preference_data(work / "train", train_prompts, seed=s.seed, **common)
        val = make_preference_data(work / "val", val_prompts, seed=s.seed + 1, **common)
        config = training_config(str(train), str(val), str(work / "run"), steps=s.steps(1500), seed=s.seed)
        config["model"]["reward"]["options"] = s.clip_options()
        reward_dir, metrics = _train_reward(config)
        _replace_dir(reward_dir, s.out / "preference")
    return metrics


def build_edit(s: BuildSettings, log) -> dict:
    from .edit import evaluate_edit, train_edit

    train_edit(s.out / "edit", steps=s.steps(600), lr=5e-4, seed=s.seed, init_from=s.out / "t2i", device=s.device)
    return evaluate_edit(s.out / "edit", n=s.count(100, 4), steps=10, device=s.device)


def build_edit_reward(s: BuildSettings, log) -> dict:
    from .edit_reward import make_edit_preference_data, training_config

    with tempfile.TemporaryDirectory(prefix="shapes-edit-reward-") as tmp:
        work = Path(tmp)
        common = {"pipeline": str(s.out / "edit"), "num_steps": 10, "device": s.device}
        train = make_edit_preference_data(work / "train", s.count(600, 4), s.seed, split="train", **common)
        val = make_edit_preference_data(work / "val", s.count(100, 4), s.seed + 1, split="heldout", **common)
        config = training_config(str(train), str(val), str(work / "run"), steps=s.steps(600), seed=s.seed)
        config["model"]["reward"]["options"] = {"clip": str((s.out / "clip").resolve())} if not s.shipped else {}
        reward_dir, metrics = _train_reward(config)
        _replace_dir(reward_dir, s.out / "edit_reward")
    return metrics


BUILDERS: dict[str, Callable[[BuildSettings, Callable[[str], None]], dict]] = {
    "t2i": build_t2i, "clip": build_clip, "verifier": build_verifier, "preference": build_preference, "edit": build_edit,
    "edit-reward": build_edit_reward,
}  # fmt: skip
DIRECTORIES = {"t2i": "t2i", "clip": "clip", "verifier": "verifier", "preference": "preference", "edit": "edit", "edit-reward": "edit_reward"}


def build(out: str | Path, *, stages: Sequence[str] = STAGES, seed: int = 0, device: str = "cpu", quick: bool = False,
          command: str | None = None, log: Callable[[str], None] = print) -> dict[str, dict]:  # fmt: skip
    """Run ``stages`` in order into ``out``; record each in ``out/manifest.json``; return their metrics."""
    from .manifest import record

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    settings = BuildSettings(Path(out), seed, device, quick)
    settings.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        log(f"[shapes build] {stage} ...")
        start = time.time()
        metrics = BUILDERS[stage](settings, log)
        minutes = (time.time() - start) / 60
        stage_command = command or f"imgalign shapes build --out {shlex.quote(str(out))} --only {stage} --seed {seed}"
        record(DIRECTORIES[stage], f"{stage_command}  ({device}, {minutes:.0f} min)", metrics, weights_dir=settings.out)
        results[stage] = metrics
        log(f"[shapes build] {stage} done in {minutes:.1f} min: {json.dumps(metrics)[:300]}")
    return results
