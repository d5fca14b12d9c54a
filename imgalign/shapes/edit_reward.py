"""The Shapes edit reward: ShapesCLIP's image tower plus a small instruction encoder.

An edit reward scores an edited image given the source image and the instruction
(``inputs = ("images", "prompts", "source_images")``, like EditReward). ShapesCLIP's text
tower only knows captions, so the instruction gets its own small encoder: the edit
tokenizer's words (:func:`imgalign.shapes.edit.edit_tokenizer`) through a two-layer
transformer, pooled and projected into ShapesCLIP's embedding space. Word order matters
("make the red circle blue" is not "make the blue circle red"), hence a transformer rather
than a bag of words. Caption words start from ShapesCLIP's token embeddings (the ids agree).

The reward's own score is the directional similarity ``cos(E(edited) - E(source), T(instruction))``
(the CLIP direction metric of Gal et al. 2022, used to evaluate InstructPix2Pix, Brooks et al.
2023, with the instruction embedded directly); it means something only once the instruction
encoder is trained (``train_reward`` with ``mode="params"``, ``trainable=["instruction."]``).
The recommended training instead puts a new head on :meth:`ShapesEditReward.features`,
``[edited, source, edited - source, instruction, (edited - source) * instruction]``, which also
sees how much of the source survived (:func:`training_config`). The instruction encoder is
initialised from a fixed seed, so a head trained over the frozen encoder (``mode="head"``)
reloads over identical features.

Preference pairs (:func:`make_edit_preference_data`) are judged by simulated raters as in
:mod:`imgalign.shapes.preference`: the oracle's edit judgement (:func:`judge_edit`, whose
``overall`` multiplies in ``edit_applied`` and ``preserved``) plus Gaussian noise, a tie
when the noisy utilities are closer than a threshold.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewards import Reward, RewardInfo, load_state_dict

from ..images import from_uint8
from .edit import edit_tokenizer, make_edit_dataset, sample_edit_in_split
from .t2i import MAX_TOKENS
from .world import Scene, caption

INIT_SEED = 0


class InstructionEncoder(nn.Module):
    """Instruction token ids -> unit vectors [B, embed_dim]: a tiny pre-norm transformer, mean-pooled."""

    def __init__(self, vocab_size: int, pad_id: int, embed_dim: int, width: int = 96, layers: int = 2,
                 heads: int = 4, max_tokens: int = MAX_TOKENS) -> None:  # fmt: skip
        super().__init__()
        self.pad_id = pad_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_tokens, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: Tensor) -> Tensor:
        mask = ids != self.pad_id  # [B, L], True on real tokens
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.proj(pooled), dim=-1)


class ShapesEditReward(Reward):
    """``scale * cos(E(edited) - E(source), T(instruction))`` over ShapesCLIP images; see the module doc."""

    def __init__(self, clip, tokenizer, scale: float = 1.0, seed: int = INIT_SEED) -> None:
        super().__init__()
        self.clip = clip  # a rewards.clip_score.ClipScore (ShapesCLIP)
        self.tokenizer = tokenizer
        self.scale = float(scale)
        model = clip.encoder.model
        embed_dim = model.visual.output_dim
        clip_words = model.token_embedding.weight
        with torch.random.fork_rng(devices=[]):  # the same initial encoder every time, global RNG untouched
            torch.manual_seed(seed)
            self.instruction = InstructionEncoder(len(tokenizer), tokenizer.pad_token_id, embed_dim,
                                                  width=clip_words.shape[1])  # fmt: skip
        with torch.no_grad():  # caption words (same ids in both tokenizers) start where ShapesCLIP put them
            self.instruction.token_embedding.weight[: clip_words.shape[0]] = clip_words.float()
        self.info = RewardInfo(
            name="shapes-edit-reward",
            inputs=("images", "prompts", "source_images"),
            source="ShapesCLIP image tower + instruction encoder (directional similarity, Gal et al. 2022; "
                   "Brooks et al. 2023)",
            score_range=(-self.scale, self.scale),
        )  # fmt: skip

    def encode_instruction(self, instructions: list[str]) -> Tensor:
        ids = self.tokenizer(
            instructions, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).input_ids
        return self.instruction(ids.to(self.device))

    def embeddings(self, images: Tensor, prompts: list[str], source_images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit ShapesCLIP embeddings of the edited and source images, and the instruction embedding."""
        both = self.clip.encoder.encode_image(torch.cat([images, source_images.to(images.dtype)]))
        edited, source = both.chunk(2)
        return edited, source, self.encode_instruction(prompts)

    def features(self, images: Tensor, prompts: list[str], source_images: Tensor | None = None) -> Tensor:
        """``[B, 5 * D]``: edited, source, edited - source, instruction, (edited - source) * instruction."""
        if source_images is None:
            raise ValueError("the Shapes edit reward needs source_images=Tensor[B,3,H,W] in [0,1]")
        edited, source, instruction = self.embeddings(images, prompts, source_images)
        change = edited - source
        return torch.cat([edited, source, change, instruction, change * instruction], dim=-1)

    def _score(self, images: Tensor, prompts: list[str], source_images: Tensor) -> Tensor:
        edited, source, instruction = self.embeddings(images, prompts, source_images)
        return self.scale * (F.normalize(edited - source, dim=-1) * instruction).sum(-1)


def shapes_edit_reward(checkpoint: str | None = None, clip: str | None = None, scale: float = 1.0) -> ShapesEditReward:
    """The untrained Shapes edit reward, registered as ``shapes-edit-reward-base``: what training starts from.

    ``clip``: a ShapesCLIP directory (default: the shipped one). ``checkpoint``: a safetensors
    file of :class:`ShapesEditReward` tensors (any subset, e.g. only ``instruction.*``) loaded
    over the fresh reward. A reward trained with ``train_reward`` is a directory: load it with
    ``rewards.load(directory)``.
    """
    from .clip import shapes_clip

    reward = ShapesEditReward(shapes_clip(clip), edit_tokenizer(), scale=scale)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        unexpected = sorted(set(state) - set(reward.state_dict()))
        if unexpected:
            raise ValueError(f"{checkpoint} is not a Shapes edit reward checkpoint: unexpected {unexpected[:5]}")
        reward.load_state_dict(state, strict=False)
    return reward.eval()


def shipped_edit_reward(checkpoint: str | None = None) -> Reward:
    """The trained, shipped edit reward (``rewards.load("shapes-edit-reward")``)."""
    from .rewards import load_shipped_reward

    return load_shipped_reward("edit_reward", "shapes-edit-reward", checkpoint)


# --------------------------------------------------------------------------- preference data


def make_edit_preference_data(
    out_dir: str | Path,
    n: int = 1000,
    seed: int = 0,
    *,
    split: str = "train",
    pipeline: str | None = None,
    samples_per_source: int = 1,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    image_guidance_scale: float = 1.5,
    noise: float = 0.05,
    tie: float = 0.03,
    device: str = "cpu",
) -> Path:
    """Render, judge and pair edits; writes ``images/*.png`` and ``pairs.jsonl``; returns its path.

    Candidates per source: the exact target render (``"target"``), the unchanged source
    (``"unchanged"``), a render of a different edit of the same source (``"wrong-edit"``) and,
    with ``pipeline`` (an edit-model directory), ``samples_per_source`` model samples. Every
    pair of one source's candidates is a record (``prompt`` = the instruction, ``image_a``,
    ``image_b``, ``source_image``, ``label``) in random order, with the oracle utilities.
    """
    from tqdm.auto import tqdm

    from ..images import save_png, to_uint8
    from .oracle import judge_edit
    from .preference import simulated_label, write_pairs

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    examples = make_edit_dataset(n, seed, split=split)
    wrong_scenes = [
        _other_edit(scene, target, rng, split)
        for scene, target in zip(examples.source_scenes, examples.target_scenes, strict=True)
    ]
    candidates: list[list[tuple[str, np.ndarray]]] = [
        [("target", examples.targets[i]), ("unchanged", examples.sources[i]), ("wrong-edit", wrong)]
        for i, wrong in enumerate(examples.render(wrong_scenes))
    ]
    if pipeline is not None:
        import pipelines

        adapter = pipelines.load(pipeline, dtype=torch.float32, device=device)
        sources = from_uint8(examples.sources)
        for k in range(samples_per_source):
            for start in tqdm(range(0, n, 64), desc=f"edit samples {k + 1}/{samples_per_source}", unit="batch"):
                chunk = slice(start, min(start + 64, n))
                seeds = [seed * 1_000_003 + i * 16 + k for i in range(chunk.start, chunk.stop)]
                gens = [torch.Generator().manual_seed(s) for s in seeds]
                with torch.no_grad():
                    edited = adapter.sample(
                        examples.instructions[chunk], image=sources[chunk].to(device), num_steps=num_steps,
                        guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, generator=gens,
                    )  # fmt: skip
                for i, image in zip(range(chunk.start, chunk.stop), edited, strict=True):
                    candidates[i].append((f"model-{k}", to_uint8(image)))
    records = []
    for i in tqdm(range(n), desc="edit preference pairs", unit="source"):
        instruction, scene = examples.instructions[i], examples.source_scenes[i]
        source_name = f"images/{i:05d}_source.png"
        save_png(examples.sources[i], out / source_name)
        judged = []
        for kind, image in candidates[i]:
            name = source_name if kind == "unchanged" else f"images/{i:05d}_{kind}.png"
            if kind != "unchanged":
                save_png(image, out / name)
            judgement = judge_edit(examples.sources[i], instruction, image, scene)
            judged.append((name, kind, float(judgement.overall)))
        for a, b in itertools.combinations(judged, 2):
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            records.append({
                "prompt": instruction, "image_a": first[0], "image_b": second[0], "source_image": source_name,
                "label": simulated_label(first[2], second[2], rng, noise, tie), "kinds": [first[1], second[1]],
                "utility_a": first[2], "utility_b": second[2], "source_caption": caption(scene),
            })  # fmt: skip
    return write_pairs(out / "pairs.jsonl", records)


def _other_edit(scene: Scene, target: Scene, rng: np.random.Generator, split: str) -> Scene:
    """The target scene of another edit of ``scene`` than the one that gives ``target``."""
    for _ in range(100):
        other = sample_edit_in_split(scene, rng, split)[1]
        if other != target:
            return other
    raise RuntimeError(f"no second edit found for {scene}")  # pragma: no cover


def training_config(train: str, val: str | None, out_dir: str, *, steps: int = 600, seed: int = 0,
                    mode: str = "full") -> dict:  # fmt: skip
    """An ``imgalign train-reward`` config for the edit reward: a new head over :meth:`ShapesEditReward.features`.

    ``mode="full"`` trains ShapesCLIP, the instruction encoder and the head (Rao-Kupper loss for
    ties); ``mode="head"`` only the head, over the fixed features.
    """
    return {
        "data": {"train": train, "val": val, "image_size": 32},
        "model": {"reward": {"name": "shapes-edit-reward-base"}, "mode": mode, "new_head": True, "head_hidden": 128},
        "loss": {"kind": "rao-kupper", "theta": 1.5},
        "optim": {"lr": 2e-4 if mode == "full" else 1e-3, "warmup_steps": 20, "weight_decay": 0.01},
        "train": {"batch_size": 32, "max_steps": steps, "seed": seed, "checkpoint_every": 200, "report_to": []},
        "validation": {"every": 100},
        "output_dir": out_dir,
    }  # fmt: skip


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build preference data for, and train, the Shapes edit reward.")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write pairs.jsonl + images for edit preference pairs")
    data.add_argument("--out", required=True)
    data.add_argument("--n", type=int, default=1000, help="number of source images")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--split", default="train", choices=["train", "heldout"])
    data.add_argument("--pipeline", default=None, help="edit-model directory whose samples join the candidates")
    data.add_argument("--samples-per-source", type=int, default=1)
    data.add_argument("--num-steps", type=int, default=20)
    data.add_argument("--device", default="cpu")
    train = commands.add_parser("train", help="train the reward (imgalign train-reward)")
    train.add_argument("--train", required=True, help="training pairs.jsonl")
    train.add_argument("--val", default=None, help="validation pairs.jsonl (default: 10%% of --train)")
    train.add_argument("--out", required=True, help="run directory (the reward is written to <out>/reward)")
    train.add_argument("--steps", type=int, default=600)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mode", default="full", choices=["full", "head"])
    args = parser.parse_args()
    if args.command == "data":
        print(make_edit_preference_data(
            args.out, args.n, args.seed, split=args.split, pipeline=args.pipeline,
            samples_per_source=args.samples_per_source, num_steps=args.num_steps, device=args.device,
        ))  # fmt: skip
    else:
        from imgalign.train.config import from_dict
        from imgalign.train.reward_model import RewardModelTrainingConfig
        from imgalign.train.run import train

        config = training_config(args.train, args.val, args.out, steps=args.steps, seed=args.seed, mode=args.mode)
        print(train(from_dict(RewardModelTrainingConfig, config)).weights_dir)
