"""Every shipped recipe is covered here: it resolves as shipped and runs two steps.

Recipes for real checkpoints run on tiny random-weight pipelines of the same family (the
``pipe_dirs`` fixture of conftest.py) with a tiny stand-in reward; the Shapes recipes run on
the shipped Shapes weights as they are; reward-model recipes train on a tiny pairs file. Adding a
recipe is one line in :data:`STAND_IN_RECIPES`, :data:`SHAPES_RECIPES` or :data:`REWARD_RECIPES`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rewards
from imgalign.images import save_png
from imgalign.train.config import load_yaml
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from rewards import Reward, RewardInfo

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]

#: Recipes for real checkpoints -> the tiny stand-in family they run on here.
STAND_IN_RECIPES = {
    "sd15_hpsv2_refl.yaml": "sd15",
    "sdxl_pickscore_draft_lv.yaml": "sdxl",
    "sd35_imagereward_refl.yaml": "sd3",
    "ip2p_editreward_refl.yaml": "instruct-pix2pix",
    "sd15_pickapic_dpo.yaml": "sd15",
    "sdxl_pickapic_dpo.yaml": "sdxl",
    "sd35_flow_dpo.yaml": "sd3",
    "ip2p_editreward_dpo.yaml": "instruct-pix2pix",
    "sd35_tpo.yaml": "sd3",
    "sd35_pickscore_grpo.yaml": "sd3",
    "sd35_rule_grpo.yaml": "sd3",
    "sd15_aesthetic_ddpo.yaml": "sd15",
    "flux_hpsv21_grpo.yaml": "flux",
    "sd35_nft.yaml": "sd3",
}
#: Recipes that run on the shipped Shapes weights, no stand-ins needed.
SHAPES_RECIPES = ("shapes_verifier_draft.yaml", "shapes_verifier_dpo.yaml", "shapes_oracle_tpo.yaml", "shapes_oracle_grpo.yaml",
                  "shapes_oracle_nft.yaml")
#: Reward-model recipes (method: reward): they run on a tiny pairs file in place of their data.
REWARD_RECIPES = ("reward.yaml",)


# ----------------------------------------------------------------------------- tiny stand-in rewards
def _redness(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


class RecipeRed(Reward):
    info = RewardInfo(name="test-recipe-red", inputs=("images",))

    def _score(self, images, prompts=None, **_):
        return _redness(images)


class RecipeRedEdit(Reward):
    info = RewardInfo(name="test-recipe-red-edit", inputs=("images", "source_images"))

    def _score(self, images, prompts=None, source_images=None):
        return _redness(images) - (images - source_images).abs().mean(dim=(1, 2, 3))


rewards.register("test-recipe-red", lambda **kw: RecipeRed(), overwrite=True)
rewards.register("test-recipe-red-edit", lambda **kw: RecipeRedEdit(), overwrite=True)


@pytest.fixture(scope="module")
def pickapic_pairs(tmp_path_factory) -> Path:
    """A tiny pairs file in Pick-a-Pic v2's own column names: caption, jpg_0, jpg_1, label_0 (and label_1)."""
    root = tmp_path_factory.mktemp("pickapic")
    g = torch.Generator().manual_seed(3)
    rows = []
    for i, label_0 in enumerate([1.0, 0.0, 1.0, 0.5]):  # the tie is dropped by the recipes (dpo.keep_ties: false)
        for j in (0, 1):
            save_png(torch.rand(3, SIZE, SIZE, generator=g), root / f"{i}_{j}.png")
        rows.append({"caption": PROMPTS[i % 3], "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": label_0,
                     "label_1": 1.0 - label_0})  # fmt: skip
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reward_pairs(tmp_path_factory) -> Path:
    """A tiny pairs file in the train-reward format: image_a, image_b, prompt, label and per-aspect labels."""
    root = tmp_path_factory.mktemp("reward-pairs")
    g = torch.Generator().manual_seed(4)
    rows = []
    for i, label in enumerate(["A", "B", "tie", "A", "B", "A"]):
        for side in "ab":
            save_png(torch.rand(3, SIZE, SIZE, generator=g), root / f"{i}_{side}.png")
        rows.append({"image_a": f"{i}_a.png", "image_b": f"{i}_b.png", "prompt": PROMPTS[i % 3], "label": label,
                     "labels": {"prompt": label, "quality": "A" if i % 2 else "B"}})  # fmt: skip
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- tests
def test_every_recipe_is_covered():
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    covered = {*STAND_IN_RECIPES, *SHAPES_RECIPES, *REWARD_RECIPES}
    assert shipped == covered, f"not covered by a test: {sorted(shipped - covered)}; gone: {sorted(covered - shipped)}"


@pytest.mark.parametrize("recipe", SHAPES_RECIPES)
def test_shapes_recipe_runs_as_shipped(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe names the shipped model, so it runs from any directory
    path = ROOT / "recipes" / recipe
    method = load_yaml(path)["method"]
    overrides = [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2", "sampling.num_steps=6",
                 "validation.num_images=2"]  # fmt: skip
    if method == "nft":  # 8 images per prompt in chunks of 16: shrunk to a small rollout
        overrides += ["nft.group_size=4", "nft.train_batch_size=8"]
    result = train(load_method_config(method, path, overrides))
    assert result.step == 2 and result.weights_dir is not None and result.weights_dir.exists()


@pytest.mark.parametrize("recipe", sorted(STAND_IN_RECIPES))
def test_recipe_resolves_and_runs_two_steps_with_tiny_stand_ins(recipe, pipe_dirs, image_folder, pickapic_pairs, tmp_path):
    path = ROOT / "recipes" / recipe
    family = STAND_IN_RECIPES[recipe]
    method = load_yaml(path)["method"]
    published = load_method_config(method, path, [])  # resolves as shipped
    edit = family == "instruct-pix2pix"
    if edit:
        assert published.reward == "editreward"  # swapped below: the registry may not have it yet
    overrides = [
        f"pipeline={pipe_dirs[family]}", f"reward={'test-recipe-red-edit' if edit else 'test-recipe-red'}",
        "reward_options={}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=1",
        "train.gradient_accumulation_steps=1", "train.mixed_precision=no", "train.report_to=[]",
        f"sampling.height={SIZE}", f"sampling.width={SIZE}", "train.checkpoint_every=1", "validation.every=0",
        "validation.num_images=1", f"data.prompts={json.dumps(PROMPTS)}", f"data.images={image_folder}",
    ]  # fmt: skip
    if getattr(published.data, "source", None) == "pairs":
        overrides.append(f"data.pairs={pickapic_pairs}")
    if method == "tpo":  # each segment's own labeller, swapped too; the segments keep their own
        assert [s.reward for s in published.tpo.per_segment] == ["hpsv2.1", "clip"]
        overrides.append("tpo.per_segment=[{reward: test-recipe-red}, {reward: test-recipe-red}]")
        overrides.append("tpo.num_timesteps=20")
    if method == "grpo":  # the published group sizes and step counts, shrunk to two tiny rollouts
        assert published.grpo.group_size >= 12 and published.sampling.num_steps >= 10
        overrides += ["grpo.group_size=2", "grpo.train_batch_size=1", "sampling.num_steps=4"]
    if method == "nft":  # the published group size and steps, shrunk to two tiny rollouts
        assert published.nft.group_size == 24 and published.sampling.num_steps == 10
        overrides += ["nft.group_size=2", "nft.train_batch_size=2", "sampling.num_steps=4"]
    result = train(load_method_config(method, path, overrides))
    assert result.step == 2 and result.weights_dir is not None and result.weights_dir.exists()
    assert all(m.get("skipped", 0) == 0 for m in result.metrics)
    if not published.lora.enabled:  # full fine-tuning saves the whole pipeline
        assert result.weights_dir.name == "pipeline"


@pytest.mark.parametrize("recipe", REWARD_RECIPES)
def test_reward_recipe_resolves_and_runs_two_steps(recipe, reward_pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe names its reward by registry name, so it runs from any directory
    path = ROOT / "recipes" / recipe
    assert load_yaml(path)["method"] == "reward"
    published = load_method_config("reward", path, [])  # resolves as shipped
    assert published.data.train and published.model.reward["name"]
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.train={reward_pairs}", "data.val=null", "data.val_fraction=0.34",
                 "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "train.report_to=[]",
                 "validation.every=1"]  # fmt: skip
    result = train(load_method_config("reward", path, overrides))
    assert result.step == 2 and result.weights_dir is not None and (result.weights_dir / "model.safetensors").is_file()
    assert isinstance(rewards.load(str(result.weights_dir)), rewards.training.TrainableReward)
