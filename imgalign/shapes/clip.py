"""ShapesCLIP: a small open_clip model trained contrastively on the Shapes world.

It is a plain :class:`rewards.clip_score.ClipScore` (registered as ``shapes-clip``): the
same differentiable CLIP-score reward as for real checkpoints, with a custom small config
and a word-level tokenizer over the caption grammar.

Training (CLIP's symmetric InfoNCE, Radford et al. 2021 eq. in fig. 3) uses two things that
make the score attribute-sensitive rather than a bag-of-words: hard-negative captions (the
same scene with one attribute changed, one each for kind, colour, size and position) added
to the text side of every batch (with one random negative, colour alone explained the batch
and kind, size and position stayed at chance), and images degraded the way generated images
are (pixel noise, blur, colour jitter), so the reward ranks imperfect samples instead of only
clean renders. Held-out accuracies per attribute are in the README and the weights' manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rewards import Reward, RewardInfo

from ..images import from_uint8
from .world import COLOURS, KINDS, POSITIONS, SIZES, LayoutError, Scene, caption, render_batch, sample_scene

CONTEXT_LENGTH = 48


def clip_config(vocab_size: int, pad_id: int, eos_id: int) -> dict:
    """open_clip ``CLIP(**cfg)`` config: ViT on 32x32 (4x4 patches) + a 2-layer text tower.

    The text feature is read at the ``<eos>`` token (``pool_type="eos"``): open_clip's default
    ``"argmax"`` pools at the *largest token id*, which is only the end token for CLIP's BPE
    vocabulary; with our alphabetical word vocabulary it would pool at a colour word.
    """
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 3, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 96, "heads": 3,
                     "layers": 2, "pad_id": pad_id, "eos_id": eos_id, "pool_type": "eos"},
    }  # fmt: skip


class ShapesTextTokenizer:
    """prompts -> LongTensor [B, 48] with the Shapes word-level vocabulary (open_clip's interface)."""

    def __init__(self) -> None:
        from .t2i import shapes_tokenizer

        self.tokenizer = shapes_tokenizer()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    @property
    def config(self) -> dict:
        tok = self.tokenizer
        return clip_config(len(tok), tok.pad_token_id, tok.eos_token_id)


def shapes_clip(checkpoint: str | None = None, scale: float = 1.0, load_weights: bool = True):
    """The shipped ShapesCLIP as a :class:`rewards.clip_score.ClipScore` reward."""
    from rewards.clip_score import ClipScore

    from .manifest import WEIGHTS_DIR

    directory = Path(checkpoint) if checkpoint else WEIGHTS_DIR / "clip"
    tokenizer = ShapesTextTokenizer()
    config = tokenizer.config  # a fresh model is built from the code's config ...
    if load_weights:  # ... saved weights from the config they were trained with
        config = json.loads((directory / "config.json").read_text())["open_clip_config"]
    return ClipScore.from_options(
        arch=config, pretrained=None, checkpoint=str(directory / "model.safetensors") if load_weights else None,
        tokenizer=tokenizer, scale=scale, load_weights=load_weights, name="shapes-clip",
    )  # fmt: skip


ATTRIBUTE_CHOICES = {"kind": KINDS, "colour": COLOURS, "size": SIZES, "position": POSITIONS}


def perturb(scene: Scene, rng: np.random.Generator, field: str | None = None) -> Scene:
    """The same scene with one attribute (``field``, or a random one) of one shape changed."""
    for _ in range(50):
        i = int(rng.integers(len(scene.shapes)))
        shape = scene.shapes[i]
        name = field or list(ATTRIBUTE_CHOICES)[rng.integers(4)]
        value = rng.choice([c for c in ATTRIBUTE_CHOICES[name] if c != getattr(shape, name)])
        shapes = list(scene.shapes)
        shapes[i] = dataclasses.replace(shape, **{name: str(value)})
        try:
            return Scene(scene.background, tuple(shapes))
        except LayoutError:
            continue
    other = [c for c in COLOURS if c != scene.background and all(s.colour != c for s in scene.shapes)]
    return Scene(str(rng.choice(other)), scene.shapes)


def one_attribute_changes(scene: Scene, field: str) -> list[Scene]:
    """Every valid scene with ``field`` of exactly one shape changed (the exhaustive :func:`perturb`)."""
    out = []
    for i, shape in enumerate(scene.shapes):
        for value in ATTRIBUTE_CHOICES[field]:
            if value == getattr(shape, field):
                continue
            shapes = list(scene.shapes)
            shapes[i] = dataclasses.replace(shape, **{field: value})
            try:
                changed = Scene(scene.background, tuple(shapes))
            except LayoutError:
                continue
            if changed != scene and changed not in out:
                out.append(changed)
    return out


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random pixel noise, blur and colour jitter on [B,3,H,W] in [0,1] (half the batch kept clean)."""
    b = images.shape[0]
    strength = torch.rand(b, 1, 1, 1, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    noisy = images + 0.25 * strength * torch.randn(images.shape, generator=generator)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    blurred = F.conv2d(F.pad(noisy, (1, 1, 1, 1), mode="replicate"), (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3), groups=3)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * strength
    jitter = 1 + 0.2 * strength * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5)
    return ((1 - mix) * noisy + mix * blurred).mul(jitter).clamp(0, 1)


def train_shapes_clip(out_dir: str | Path, *, steps: int = 2000, batch_size: int = 64, lr: float = 5e-4,
                      seed: int = 0, device: str = "cpu") -> Path:  # fmt: skip
    """Train from scratch; save ``config.json`` + ``model.safetensors`` (fp16) atomically."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from imgalign.io import atomic_directory
    from imgalign.train.loop import plain_step

    reward = shapes_clip(load_weights=False).to(device)
    model = reward.encoder.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    start = time.time()
    for step in (bar := tqdm(range(steps), desc="shapes clip", unit="step")):
        scenes = [sample_scene(rng, split="train") for _ in range(batch_size)]
        images = from_uint8(render_batch(scenes, 32, rng))
        images = degrade(images, generator).to(device)
        # one hard negative per attribute type, so no single attribute (colour) explains the batch
        texts = [caption(s, rng) for s in scenes]
        texts += [caption(perturb(s, rng, field), rng) for field in ATTRIBUTE_CHOICES for s in scenes]
        img = F.normalize(model.encode_image(reward.encoder.pixels(images)), dim=-1)
        txt = F.normalize(model.encode_text(reward.encoder.tokenizer(texts).to(device)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, 5B]: captions, then hard negatives
        target = torch.arange(batch_size, device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :batch_size].T, target)) / 2
        plain_step(loss, model.parameters(), optimizer, schedule)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", min=f"{(time.time() - start) / 60:.1f}")
    model.eval()
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps({"open_clip_config": reward.encoder.tokenizer.config}, indent=2))
    return out_dir


@torch.no_grad()
def evaluate_shapes_clip(reward, n: int = 500, seed: int = 99) -> dict:
    """Held-out accuracy of preferring the true caption over its one-attribute perturbation."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split="heldout") for _ in range(n)]
    images = from_uint8(render_batch(scenes, 32, rng))
    true = reward.score_batched(images, [caption(s, rng) for s in scenes])
    false = reward.score_batched(images, [caption(perturb(s, rng), rng) for s in scenes])
    return {"heldout_pair_accuracy": float((true > false).float().mean()), "margin": float((true - false).mean())}


class ShapesCaptionContrast(Reward):
    """``log p(caption | image)`` against hard-negative captions, under ShapesCLIP.

    A raw CLIP score rises with anything caption-like and saturates (held-out samples of the
    shipped model score nearly as high as training prompts), so its gradient says little about
    *which* attribute is wrong. This reward is a classifier over captions instead: the true caption
    against ``negatives`` copies per attribute in ``fields`` with that attribute of one shape
    changed (:func:`perturb`, the same hard negatives ShapesCLIP was trained with), as a
    softmax of ShapesCLIP's logits (its learned temperature). Restricting ``fields`` targets
    attributes: ``fields=("colour",)`` rewards exactly "the colours are right rather than
    swapped", the attribute ShapesCLIP separates best on held-out scenes. The idea is
    CLIP's zero-shot classification (Radford et al. 2021, sec. 3.1.2) used as a reward.

    Negatives are a deterministic function of (prompt, seed) and use the prompt's own
    paraphrase template, so only the attributes differ between the candidates.
    """

    def __init__(self, clip=None, fields: Sequence[str] = tuple(ATTRIBUTE_CHOICES), negatives: int = 2,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        unknown = [f for f in fields if f not in ATTRIBUTE_CHOICES]
        if unknown or not fields:
            raise ValueError(f"fields must be among {', '.join(ATTRIBUTE_CHOICES)}; got {list(fields)}")
        if negatives < 0:
            raise ValueError(f"negatives must be >= 0 (0: every one-attribute change), got {negatives}")
        self.clip = clip if clip is not None else shapes_clip()
        self.fields, self.negatives, self.seed = tuple(fields), int(negatives), int(seed)
        self.info = RewardInfo(
            name="shapes-clip-contrast" if self.fields == tuple(ATTRIBUTE_CHOICES) else f"shapes-clip-contrast-{'-'.join(self.fields)}",
            inputs=("images", "prompts"),
            source="imgalign.shapes.clip: ShapesCLIP zero-shot log-probability of the caption against one-attribute changes",
            score_range=(-math.inf, 0.0),
        )  # fmt: skip

    def candidates(self, prompt: str) -> list[str]:
        """The prompt, then its hard negatives (same template, one attribute of one shape changed)."""
        from .world import N_CAPTION_TEMPLATES, parse_caption

        scene = parse_caption(prompt)
        template = next((t for t in range(N_CAPTION_TEMPLATES) if caption(scene, template=t) == prompt), 0)
        rng = np.random.default_rng([self.seed, zlib.crc32(prompt.encode())])
        out = [prompt]
        for field in self.fields:
            if self.negatives == 0:
                out += [caption(s, template=template) for s in one_attribute_changes(scene, field)]
                continue
            for _ in range(self.negatives):
                out.append(caption(perturb(scene, rng, field), template=template))
        return out

    def _score(self, images: torch.Tensor, prompts: list[str], **cond) -> torch.Tensor:
        encoder = self.clip.encoder
        candidates = [self.candidates(p) for p in prompts]  # the prompt first; lengths vary with negatives=0
        image = encoder.encode_image(images)  # [B, D], unit norm
        text = encoder.encode_text([c for group in candidates for c in group]).split([len(g) for g in candidates])
        scale = encoder.model.logit_scale.exp()
        return torch.stack([torch.log_softmax(scale * (t @ v), dim=0)[0] for v, t in zip(image, text)])


def shapes_clip_contrast(fields: str | Sequence[str] = tuple(ATTRIBUTE_CHOICES), negatives: int = 2,
                         seed: int = 0, checkpoint: str | None = None) -> ShapesCaptionContrast:  # fmt: skip
    """``rewards.load("shapes-clip-contrast", fields="colour")``: see :class:`ShapesCaptionContrast`."""
    if isinstance(fields, str):
        fields = tuple(f.strip() for f in fields.replace("+", ",").split(",") if f.strip())
    return ShapesCaptionContrast(shapes_clip(checkpoint), fields, negatives, seed)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train ShapesCLIP.")
    parser.add_argument("--out", default="imgalign/shapes/weights/clip")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = train_shapes_clip(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(out, evaluate_shapes_clip(shapes_clip(str(out))))
