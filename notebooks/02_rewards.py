# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Rewards: the zoo, composites, training one, and watching it get hacked
#
# Every reward takes images in `[0, 1]` and prompts and returns one differentiable score per
# image. This notebook scores the same images with the Shapes reward zoo and a composite,
# trains a small reward on preference pairs rated by simulated annotators (with ties), measures
# it with the tie-aware accuracy of Deutsch et al. (2023), and then optimises the shipped
# preference reward with DRaFT while the exact oracle watches: the learned score climbs, the
# oracle's does not. All runs are tiny (a few steps, a few dozen pairs), sized to run in CI;
# the README gives the full-size numbers.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

import rewards
from imgalign.images import from_uint8, save_grid
from imgalign.prompt_sets import prompt_set
from imgalign.shapes.world import make_dataset
from imgalign.train.registry import load_method_config
from imgalign.train.run import train
from rewards.evaluation import accuracy_with_ties, pairwise_accuracy

OUT = Path(os.environ.get("IMGALIGN_NOTEBOOK_OUT", "runs/notebooks")) / "02_rewards"
OUT.mkdir(parents=True, exist_ok=True)
RECIPES = Path.cwd().parent / "recipes"  # notebooks/ sits next to recipes/ in the repository

# %% [markdown]
# ## The zoo, and a composite
# Rendered ground-truth scenes scored against their own captions and against another scene's
# caption: a useful reward separates the two. A composite (`{"shapes-verifier": 1, "shapes-clip":
# 0.5}`) is a reward too; in training mode it standardises members without published
# statistics by running estimates, in eval mode it adds raw scores.

# %%
scenes, captions, _ = make_dataset(16, seed=7)
images = from_uint8(scenes)
shuffled = captions[1:] + captions[:1]
zoo = {name: rewards.load(name) for name in ("shapes-oracle", "shapes-clip", "shapes-verifier", "shapes-preference")}
zoo["verifier + 0.5 clip"] = rewards.load({"shapes-verifier": 1.0, "shapes-clip": 0.5}).eval()
with torch.no_grad():
    matched = {n: r(images, captions).mean().item() for n, r in zoo.items()}
    mismatched = {n: r(images, shuffled).mean().item() for n, r in zoo.items()}
for name, reward in zoo.items():
    info = reward.info
    print(f"{name:22s} differentiable={info.differentiable!s:5s} range={info.score_range}  "
          f"matched {matched[name]:+.3f}  mismatched {mismatched[name]:+.3f}")

fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
x = np.arange(len(zoo))
ax.bar(x - 0.2, list(matched.values()), 0.4, label="own caption")
ax.bar(x + 0.2, list(mismatched.values()), 0.4, label="another scene's caption")
ax.set_xticks(x, list(zoo), rotation=15)
ax.axhline(0, color="black", lw=0.8)
ax.set_ylabel("mean score (each reward's own scale)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Training a reward on preference pairs
# `make_preference_data` samples the Shapes model, and simulated raters (the oracle plus noise,
# with a tie threshold) label every pair of a prompt's samples: A, B or tie, overall and per
# aspect. `recipes/reward.yaml` trains a two-aspect head on frozen ShapesCLIP features with the
# Rao-Kupper loss (Bradley-Terry with ties). Each prompt here has two samples and the exact render. This is the `reward` method of the same training
# skeleton as every other trainer (`imgalign train-reward --config recipes/reward.yaml`).

# %%
from imgalign.shapes.preference import make_preference_data

align = prompt_set("shapes-heldout-align")
pair_options = {"samples_per_prompt": 2, "render_fraction": 1.0, "num_steps": 3}  # 2 samples + the exact render per prompt
train_pairs = make_preference_data(OUT / "pairs_train", align[:16], seed=0, **pair_options)
val_pairs = make_preference_data(OUT / "pairs_val", align[16:28], seed=1, **pair_options)
cfg = load_method_config("reward", str(RECIPES / "reward.yaml"), [
    f"data.train={train_pairs}", f"data.val={val_pairs}", f"output_dir={OUT / 'reward_run'}",
    "train.max_steps=30", "train.batch_size=16", "train.checkpoint_every=0", "train.report_to=[]",
    "validation.every=0", "optim.warmup_steps=5"])  # fmt: skip
trained = train(cfg, overwrite=True)
print("trained reward:", trained.weights_dir)

# %% [markdown]
# Accuracy on the held-out pairs. *Pairwise accuracy* leaves out the pairs the raters tied;
# *accuracy with ties* keeps them and lets the reward call a tie when its margin is below an
# epsilon chosen to maximise accuracy (Deutsch et al. 2023, as EditReward reports). The
# shipped `shapes-preference` was trained the same way (all of ShapesCLIP, not only a head) on
# thousands of pairs; with a few dozen pairs and 30 steps, expect little above chance.

# %%
records = [json.loads(line) for line in val_pairs.read_text().splitlines()]
side = {"A": 1, "B": -1, "tie": 0}
human = np.array([side[r["label"]] for r in records])


def margins(reward) -> np.ndarray:
    load = lambda key: torch.stack([rewards.load_image(val_pairs.parent / r[key])[0] for r in records])  # noqa: E731
    texts = [r["prompt"] for r in records]
    with torch.no_grad():
        return (reward.score_batched(load("image_a"), texts) - reward.score_batched(load("image_b"), texts)).numpy()


candidates = {"trained here (30 steps)": rewards.load(str(trained.weights_dir)), "shapes-preference (shipped)": zoo["shapes-preference"],
              "shapes-clip (no training)": zoo["shapes-clip"]}  # fmt: skip
print(f"{len(records)} validation pairs, {int((human == 0).sum())} ties")
for name, reward in candidates.items():
    m = margins(reward)
    acc, eps = accuracy_with_ties(human, m)
    print(f"{name:30s} pairwise accuracy {pairwise_accuracy(human, m):.3f}   accuracy with ties {acc:.3f} (epsilon {eps:.3f})")

# %% [markdown]
# ## Reward hacking along a training run
# DRaFT-2 (gradients through the last 2 sampling steps) on the shipped `shapes-preference`
# reward, with a validation pass after every step on four held-out prompts and fixed seeds.
# Each validation grid is scored twice: by the reward being optimised and by the oracle. A
# rising learned reward with a flat or falling oracle is reward hacking, measured rather than
# guessed (at full size: preference +3.0, exact match −15.6 points; see the README).

# %%
val_prompts = prompt_set("shapes-heldout-eval")[:4]
steps = 4
cfg = load_method_config("draft", str(RECIPES / "shapes_verifier_draft.yaml"), [
    "reward=shapes-preference", f"output_dir={OUT / 'draft_run'}", f"train.max_steps={steps}", "train.batch_size=2",
    "draft.k=2", "sampling.num_steps=4", "optim.lr=3e-3", "optim.warmup_steps=0", "train.checkpoint_every=0",
    "train.report_to=[]", "validation.every=1", "validation.num_images=4", f"validation.prompts={json.dumps(val_prompts)}"])  # fmt: skip
run = train(cfg, overwrite=True)


def grid_tiles(path: Path, n: int, size: int = 32, pad: int = 2) -> torch.Tensor:
    """The images of a validation grid (torchvision's make_grid layout: near-square, 2-px gutters)."""
    grid = rewards.load_image(path)[0]
    ncols = int(np.ceil(np.sqrt(n)))
    tiles = [grid[:, pad + (i // ncols) * (size + pad):][:, :size, pad + (i % ncols) * (size + pad):][:, :, :size]
             for i in range(n)]  # fmt: skip
    return torch.stack(tiles)


history = []
for path in sorted((OUT / "draft_run" / "validation").glob("step-*.png")):
    tiles = grid_tiles(path, len(val_prompts))
    with torch.no_grad():
        history.append((int(path.stem.split("-")[1]), zoo["shapes-preference"](tiles, val_prompts).mean().item(),
                        zoo["shapes-oracle"](tiles, val_prompts).mean().item(), tiles))  # fmt: skip

fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
step_axis = [h[0] for h in history]
ax.plot(step_axis, [h[1] for h in history], marker="o", color="tab:red", label="shapes-preference (optimised)")
ax.set_xlabel("DRaFT step")
ax.set_ylabel("learned reward")
twin = ax.twinx()
twin.plot(step_axis, [h[2] for h in history], marker="s", color="tab:blue", label="oracle overall")
twin.set_ylabel("oracle overall")
ax.legend(loc="upper left", fontsize=8)
twin.legend(loc="lower right", fontsize=8)
ax.set_title("learned reward vs the oracle along a DRaFT run (tiny run)")
plt.tight_layout()
plt.show()

# %%
save_grid(torch.cat([history[0][3], history[-1][3]]), OUT / "hacking.png", ncols=len(val_prompts))
print("validation images at step 0 (top) and at the last step (bottom)")
display(Image(filename=str(OUT / "hacking.png")))

# %% [markdown]
# ## On a GPU with a real checkpoint
# The same calls with HPSv2.1 and PickScore on real images. Set `RUN_ON_GPU = True` on a machine
# with a CUDA GPU and the checkpoints local (`HPS_v2.1_compressed.pt` and the PickScore
# directory; the README's offline section says where each reward looks). With the flag off, as
# in CI, the composite is built from rewards that need no download (JPEG compressibility and its
# opposite), so the cell's code runs on every test run.

# %%
RUN_ON_GPU = False

if RUN_ON_GPU:
    device = "cuda"
    mix = rewards.load({"hpsv2.1": 1.0, "pickscore": 0.5}).to(device)
    size = 512
else:
    device = "cpu"
    mix = rewards.load({"jpeg-compressibility": 1.0, "jpeg-incompressibility": 0.5})
    size = 32
batch = torch.rand(4, 3, size, size, device=device)
with torch.no_grad():
    print({k: [round(float(v), 3) for v in vals] for k, vals in mix.score_components(batch, ["a photo of a cat"] * 4).items()})
