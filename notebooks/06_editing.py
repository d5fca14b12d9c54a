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
# # 6. Editing: edit rewards, curating an edit dataset, edit alignment
#
# An instruction-edit model takes a source image and an instruction ("make the circle red");
# an edit reward scores the result given both (EditReward on real images; the learned
# `shapes-edit-reward` here), and the oracle's `judge_edit` says exactly whether the edit was
# applied and the rest preserved. This notebook scores edits, curates an edit dataset with
# `imgalign filter`, and aligns the Shapes edit model with ReFL on the edit reward.
#
# All runs are tiny (4 held-out sources, 4 sampling steps, 3 training steps); the README's
# `imgalign demo --algo edit-refl` result at full size is a warning: the edit reward rose
# while the oracle's quality fell, so read the oracle column, not the reward's.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

import pipelines
import rewards
from imgalign.cli import main as imgalign
from imgalign.images import from_uint8, save_grid, save_png
from imgalign.shapes.demo import EDIT_METRICS, edit_training_config, evaluate_edits, gains
from imgalign.shapes.edit import make_edit_dataset, write_edit_sources
from imgalign.shapes.oracle import judge_edit
from imgalign.shapes.t2i import load_shipped_pipeline
from imgalign.train.run import train

OUT = Path(os.environ.get("IMGALIGN_NOTEBOOK_OUT", "runs/notebooks")) / "06_editing"
OUT.mkdir(parents=True, exist_ok=True)
EDIT = {"images_per_source": 2, "seed": 1000, "sample_steps": 4}

# %% [markdown]
# ## Edit, and score the edits
# Held-out sources (scenes with colour/shape pairs the models never saw) and one instruction
# each. For every source: the model's two edits, the exact target render (a perfect edit) and
# the unchanged source (no edit at all), scored by the learned edit reward and by the oracle.

# %%
examples = make_edit_dataset(4, seed=5, split="heldout")
edit_reward = rewards.load("shapes-edit-reward")
adapter = load_shipped_pipeline("edit")
before = evaluate_edits(adapter, examples, edit_reward, **EDIT)
sources, targets = from_uint8(examples.sources), from_uint8(examples.targets)
k = EDIT["images_per_source"]
kinds = {"model edit": before.images[::k], "exact target": targets, "unchanged source": sources}
table = {}
for kind, images in kinds.items():
    with torch.no_grad():
        learned = edit_reward(images, examples.instructions, source_images=sources)
    truth = [judge_edit(examples.sources[i], examples.instructions[i], images[i], examples.source_scenes[i]).overall
             for i in range(len(images))]  # fmt: skip
    table[kind] = (learned.mean().item(), float(np.mean(truth)))
    print(f"{kind:17s} shapes-edit-reward {table[kind][0]:+.3f}   oracle edit score {table[kind][1]:.3f}")
print("instructions:", examples.instructions)
save_grid(torch.stack([sources, before.images[::k], targets], dim=1).flatten(0, 1), OUT / "edits.png", ncols=6)
print("source, model edit, exact target (two triplets per row)")
display(Image(filename=str(OUT / "edits.png")))

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), dpi=100)
axes[0].bar(list(table), [v[0] for v in table.values()], color="tab:orange")
axes[0].set_title("shapes-edit-reward")
axes[1].bar(list(table), [v[1] for v in table.values()], color="tab:blue")
axes[1].set_title("oracle: edit applied × rest preserved")
for ax in axes:
    ax.tick_params(axis="x", labelsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Curating an edit dataset with `imgalign filter`
# A JSONL of edit triples (`source_image`, `image`, `instruction`): the model's edits, the exact
# targets and the unchanged sources. `filter` scores each with the edit reward and keeps the
# best half per instruction (`--per prompt`); it writes `scores.jsonl`, the kept items in the
# input's format, `summary.json` and `histogram.png`. The same command line is used below from
# Python; in a shell it is `imgalign filter ...`.

# %%
items = OUT / "items"
items.mkdir(exist_ok=True)
records = []
for i, instruction in enumerate(examples.instructions):
    save_png(sources[i], items / f"{i}_source.png")
    candidates = {"edit0": before.images[i * k], "edit1": before.images[i * k + 1], "target": targets[i], "unchanged": sources[i]}
    for kind, image in candidates.items():
        save_png(image, items / f"{i}_{kind}.png")
        records.append({"source_image": f"{i}_source.png", "image": f"{i}_{kind}.png", "instruction": instruction,
                        "kind": kind, "oracle": judge_edit(examples.sources[i], instruction, image, examples.source_scenes[i]).overall})  # fmt: skip
(items / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
status = imgalign(["filter", "--data", str(items / "items.jsonl"), "--reward", "shapes-edit-reward", "--top-fraction", "0.5",
                   "--per", "prompt", "--out", str(OUT / "curated"), "--overwrite"])  # fmt: skip
assert status == 0
kept_rows = [json.loads(line) for line in (OUT / "curated" / "kept.jsonl").read_text().splitlines()]
kept = {(r["instruction"], r["kind"]) for r in kept_rows}  # kept rows keep every field; paths are rebased
for group in ("kept", "dropped"):
    chosen = [r for r in records if ((r["instruction"], r["kind"]) in kept) == (group == "kept")]
    print(f"{group:8s} {len(chosen):2d} items, oracle edit score {np.mean([r['oracle'] for r in chosen]):.3f}, kinds:",
          sorted(r["kind"] for r in chosen))
display(Image(filename=str(OUT / "curated" / "histogram.png")))

# %% [markdown]
# ## Edit alignment: ReFL on the edit reward
# The demo's `edit-refl` configuration (a LoRA on the edit model, training sources from the
# training split, `shapes-edit-reward`), shrunk to 3 steps at 4 sampling steps. The same
# held-out sources, instructions and seeds are judged before and after.

# %%
cfg = edit_training_config(OUT / "edit_refl", write_edit_sources(OUT / "train_sources", n=16), max_steps=3)
cfg.sampling.num_steps, cfg.refl.window, cfg.train.batch_size = 4, [2, 3], 2
cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 0
result = train(cfg, overwrite=True)
tuned = load_shipped_pipeline("edit")
pipelines.load_lora(tuned, result.weights_dir)
after = evaluate_edits(tuned, examples, edit_reward, **EDIT)
edit_gains = gains(before, after, EDIT_METRICS, [edit_reward.info.name])

fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
names = list(edit_gains)
values = [edit_gains[n]["gain"] for n in names]
errors = np.array([[g["gain"] - g["ci95"][0], g["ci95"][1] - g["gain"]] for g in edit_gains.values()]).T
ax.bar([n.replace("oracle/", "") for n in names], values, yerr=errors, capsize=4)
ax.axhline(0, color="black", lw=0.8)
ax.set_ylabel("gain after ReFL (95% CI)")
ax.set_title("edit alignment, oracle aspects and the learned edit reward (tiny run)")
ax.tick_params(axis="x", labelsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## On a GPU with a real checkpoint
# InstructPix2Pix with EditReward (`recipes/ip2p_editreward_refl.yaml`: a folder of source
# images with one instruction each in `data.images`). Set `RUN_ON_GPU = True` on a CUDA machine
# with `timbrooks/instruct-pix2pix` and the EditReward checkpoint available (the README's offline
# section says where EditReward looks for its weights). With the flag off, as in CI, the same
# trainer runs one step on the InstructPix2Pix architecture at a tiny size with random weights,
# rewarded by a small edit reward registered here (how any package adds one).

# %%
RUN_ON_GPU = False

from pipelines.architectures import build_pipeline
from imgalign.train.registry import load_method_config

if RUN_ON_GPU:
    recipe, overrides = "../recipes/ip2p_editreward_refl.yaml", ["data.images=edits/", "output_dir=runs/ip2p_refl"]
else:

    class ChangedPixels(rewards.Reward):
        """How far the edit moved from its source: a differentiable stand-in needing no weights."""

        info = rewards.RewardInfo(name="changed-pixels", inputs=("images", "prompts", "source_images"))

        def _score(self, images, prompts=None, source_images=None, **_):
            return (images - source_images).abs().mean(dim=(1, 2, 3))

    rewards.register("changed-pixels", lambda **_: ChangedPixels(), overwrite=True)
    build_pipeline("instruct-pix2pix", "tiny").save_pretrained(OUT / "tiny_ip2p")
    recipe, overrides = None, [f"pipeline={OUT / 'tiny_ip2p'}", "reward=changed-pixels",
                               f"data.images={write_edit_sources(OUT / 'tiny_sources', n=2)}", "sampling.num_steps=2",
                               "sampling.height=32", "sampling.width=32", "refl.window=[0,1]", "train.max_steps=1",
                               f"output_dir={OUT / 'tiny_refl'}", "train.report_to=[]", "validation.num_images=0"]  # fmt: skip
result = train(load_method_config("refl", recipe, overrides), overwrite=True)
print(result.weights_dir, result.metrics[-1].get("reward_mean"))
