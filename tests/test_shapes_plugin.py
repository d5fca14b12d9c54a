"""Shapes as a plug-in: entry points instead of import side effects, one optional reward method
for evaluation reports, and the layering rules (packages and Shapes tiers) checked on the imports."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines
import rewards
from imgalign.cli import main
from imgalign.shapes import judge, make_dataset, summarize
from imgalign.shapes.manifest import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "imgalign" / "shapes"
SHAPES_REWARDS = ("shapes-oracle", "shapes-clip", "shapes-clip-contrast", "shapes-verifier", "shapes-preference",
                  "shapes-edit-reward-base", "shapes-edit-reward")  # fmt: skip


def _fresh_python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a new interpreter outside the repository (only the installed packages);
    its last stdout line is JSON."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- entry points


def test_every_shapes_reward_and_pipeline_is_an_installed_entry_point():
    reward_eps = {ep.name: ep for ep in entry_points(group="imgalign.rewards")}
    pipeline_eps = {ep.name: ep for ep in entry_points(group="imgalign.pipelines")}
    assert set(SHAPES_REWARDS) <= set(reward_eps), "reinstall: pip install --no-deps -e ."
    assert {"shapes", "shapes-edit"} <= set(pipeline_eps)
    for ep in [*reward_eps.values(), *pipeline_eps.values()]:
        assert callable(ep.load()), ep
    assert set(SHAPES_REWARDS) <= set(rewards.available())
    assert {"shapes", "shapes-edit"} <= set(pipelines.available())


def test_fresh_process_loads_shapes_rewards_by_name(tmp_path):
    code = """
import json, sys
import rewards
names = rewards.available()
before = sorted(m for m in sys.modules if m.split(".")[0] == "imgalign")
import torch
verifier, oracle = rewards.load("shapes-verifier"), rewards.load("shapes-oracle")
from imgalign.shapes import make_dataset
images, captions, _ = make_dataset(2, seed=0)
x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
print(json.dumps({"names": names, "before": before, "verifier": verifier(x, captions).tolist(),
                  "oracle": oracle(x, captions).tolist()}))
"""
    out = _fresh_python(code, tmp_path)
    assert set(SHAPES_REWARDS) <= set(out["names"])
    assert out["before"] == []  # listing names reads metadata only: nothing of imgalign imported yet
    assert len(out["verifier"]) == 2 and all(np.isfinite(out["verifier"]))
    assert out["oracle"] == [1.0, 1.0]


@pytest.mark.slow
def test_fresh_process_loads_shipped_reward_directories_and_shapes_pipelines(tmp_path):
    code = f"""
import json, sys
import pipelines, rewards, torch
names = pipelines.available()
before = sorted(m for m in sys.modules if m.split(".")[0] == "imgalign")
adapter = pipelines.load("shapes")
images = adapter.sample(["a red circle", "a blue square"], num_steps=2,
                        generator=[torch.Generator().manual_seed(s) for s in range(2)])
edit = pipelines.load("shapes-edit")
shipped = {{}}
for name in ("preference", "edit_reward"):  # reward.json files naming Shapes rewards
    reward = rewards.load({str(WEIGHTS_DIR)!r} + "/" + name)
    cond = {{"source_images": images.flip(0)}} if "source_images" in reward.info.inputs else {{}}
    shipped[name] = reward(images, ["a red circle", "make the blue square red"], **cond).tolist()
print(json.dumps({{"names": names, "before": before, "shape": list(images.shape), "dtype": str(images.dtype),
                  "families": [adapter.family, edit.family], "edit": edit.is_edit, "shipped": shipped}}))
"""
    out = _fresh_python(code, tmp_path)
    assert {"shapes", "shapes-edit"} <= set(out["names"]) and out["before"] == []
    assert out["shape"] == [2, 3, 32, 32] and out["dtype"] == "torch.float32"
    assert out["edit"] is True
    assert all(len(v) == 2 and np.all(np.isfinite(v)) for v in out["shipped"].values())


def test_shipped_reward_json_files_name_loadable_rewards():
    files = sorted(WEIGHTS_DIR.glob("*/reward.json"))
    assert files
    for file in files:
        desc = json.loads(file.read_text())
        names = [desc["name"], *([desc["options"]["base"]["name"]] if "base" in desc.get("options", {}) else [])]
        assert set(names) <= set(rewards.available()), file
        assert isinstance(rewards.load(str(file.parent)), rewards.Reward)


def test_an_explicit_registration_shadows_the_entry_point(monkeypatch):
    monkeypatch.setattr(rewards.registry, "_REGISTRY", dict(rewards.registry._REGISTRY))

    class Constant(rewards.Reward):
        info = rewards.RewardInfo(name="constant", inputs=("images",))

        def _score(self, images, prompts, **cond):
            return images.new_full((images.shape[0],), 7.0)

    rewards.register("shapes-oracle", Constant)  # an entry point, not a registration: no overwrite needed
    assert torch.all(rewards.load("shapes-oracle")(torch.rand(2, 3, 8, 8)) == 7)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("shapes-oracle", Constant)


def test_pipeline_names_go_to_their_factory_with_the_load_options(monkeypatch):
    monkeypatch.setattr(pipelines.registry, "_REGISTRY", dict(pipelines.registry._REGISTRY))
    seen = {}

    def factory(**options):
        seen.update(options)
        return pipelines.load("shapes", **options)

    pipelines.register("my-shapes", factory)
    adapter = pipelines.load("My-Shapes", device="cpu")
    assert adapter.family == "shapes" and seen == {"dtype": None, "device": "cpu", "attention": "sdpa"}
    pipelines.register("not-an-adapter", lambda **options: object())
    with pytest.raises(TypeError, match="not a DiffusionAdapter"):
        pipelines.load("not-an-adapter")
    for bad in ("org/model", "./here"):
        with pytest.raises(ValueError, match="invalid pipeline name"):
            pipelines.register(bad, factory)


def test_sample_command_takes_the_shapes_pipeline_by_name(tmp_path):
    out = tmp_path / "out"
    code = main(["sample", "--pipeline", "shapes", "--prompt", "a red circle", "--num-images", "2", "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["0000.png", "0001.png"] and records[0]["pipeline"] == "shapes"
    assert (out / "0001.png").is_file() and (out / "grid.png").is_file()


# --------------------------------------------------------------------------- details


def test_reward_details_default_to_none_and_a_plain_mean_summary():
    class Brightness(rewards.Reward):
        info = rewards.RewardInfo(name="brightness", inputs=("images",))

        def _score(self, images, prompts, **cond):
            return images.mean(dim=(1, 2, 3))

    reward = Brightness()
    assert reward.details(torch.rand(2, 3, 4, 4)) is None
    assert reward.summarize_details([{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}]) == {"n": 2, "a": 0.5, "b": 0.5}


def test_oracle_details_give_every_aspect_per_image_and_the_oracle_summary():
    oracle = rewards.load("shapes-oracle")
    images, captions, _ = make_dataset(6, seed=4)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    captions = captions[:3] + captions[4:] + captions[3:4]  # three right, three wrong
    rows = oracle.details(x, captions)
    judgements = judge(x, captions)
    assert [row["overall"] for row in rows] == [j.overall for j in judgements]
    assert set(rows[0]) == {"overall", "exact", "quality", "background", "colour", "shape", "count", "size", "position",
                            "layout", "appearance"}  # fmt: skip
    for row in rows:  # the two halves timestep-segment DPO labels its segments with
        assert row["layout"] == pytest.approx((row["count"] + row["size"] + row["position"]) / 3)
        assert row["appearance"] == pytest.approx((row["background"] + row["colour"] + row["shape"] + row["quality"]) / 4)
    assert oracle.summarize_details(rows) == summarize(judgements)  # the report's numbers, key order included
    assert list(oracle.summarize_details(rows)) == list(summarize(judgements))


# --------------------------------------------------------------------------- layering

WORLD, MODELS, APPLICATIONS = 0, 1, 2
TIERS = {
    "__init__": WORLD, "world": WORLD, "oracle": WORLD,
    "t2i": MODELS, "edit": MODELS, "clip": MODELS, "verifier": MODELS, "preference": MODELS,
    "edit_reward": MODELS, "rewards": MODELS, "manifest": MODELS,
    "build": APPLICATIONS, "demo": APPLICATIONS, "algorithms": APPLICATIONS,
}  # fmt: skip
WORLD_DEPENDENCIES = {"numpy", "scipy"}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (at any depth, relative imports resolved)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import world`
    return names


def _shapes_module(name: str) -> str | None:
    """``imgalign.shapes.oracle.judge`` -> ``oracle``; a name re-exported by the package -> ``__init__``."""
    parts = name.split(".")
    if parts[:2] != ["imgalign", "shapes"]:
        return None
    return parts[2] if len(parts) > 2 and parts[2] in TIERS else "__init__"


def test_every_shapes_module_has_a_tier():
    assert {p.stem for p in SHAPES.glob("*.py")} == set(TIERS), "new module: give it a tier here and in the docstring"


@pytest.mark.parametrize("module", sorted(TIERS))
def test_shapes_modules_import_only_their_own_tier_or_lower(module):
    imported = _imports(SHAPES / f"{module}.py", "imgalign.shapes")
    for name in imported:
        target = _shapes_module(name)
        if target is not None:
            assert TIERS[target] <= TIERS[module], f"{module} (tier {TIERS[module]}) imports {name} (tier {TIERS[target]})"
        elif TIERS[module] == WORLD:  # the world: the standard library, numpy and scipy only
            assert name.split(".")[0] in sys.stdlib_module_names | WORLD_DEPENDENCIES, f"the world module {module} imports {name}"


@pytest.mark.parametrize("package", ["rewards", "pipelines"])
def test_rewards_and_pipelines_never_import_imgalign_or_each_other(package):
    other = {"rewards": "pipelines", "pipelines": "rewards"}[package]
    for path in sorted((ROOT / package).glob("*.py")):
        top = {name.split(".")[0] for name in _imports(path, package)}
        assert not top & {"imgalign", other}, f"{path.relative_to(ROOT)} imports {sorted(top & {'imgalign', other})}"
