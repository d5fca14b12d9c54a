"""Build and train the Shapes edit model (a :class:`pipelines.ShapesEditPipeline`).

InstructPix2Pix (Brooks et al. 2023, "InstructPix2Pix: Learning to Follow Image Editing
Instructions") turns a text-to-image model into an instruction-following editor: the image
to edit is concatenated to the denoiser's input, the edit instruction replaces the caption,
and every weight starts from the text-to-image model, with the input-layer weights of the
new image channels at zero (sec. 3.2) so the first steps of fine-tuning start from the
text-to-image model's behaviour instead of from noise. It is trained on (source, instruction,
target) triples with the denoising loss; the instruction and the source image are dropped
for some examples (5% each, and 5% both) so that sampling can use its two guidance scales.

Here the triples need no generated data: :func:`imgalign.shapes.world.sample_edit` gives an
instruction and the exact target scene, and both scenes are rendered with the same jitter so
untouched shapes stay in place. The loss is the Shapes T2I model's rectified-flow loss
(:func:`imgalign.shapes.t2i.flow_matching_loss`) with the source as extra input. Sources come
from the training split and edits that would create a held-out colour/shape pair are
redrawn, so :func:`evaluate_edit` on held-out sources measures compositional generalisation.

The instruction words ("make", "move", "remove", ...) are appended to the caption vocabulary
(:func:`edit_tokenizer`), so every caption word keeps the id the T2I text encoder was trained
with and the new rows are freshly initialised (unit variance, as in :mod:`imgalign.shapes.t2i`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..images import from_uint8
from .manifest import WEIGHTS_DIR
from .t2i import SPECIAL_TOKENS, TEXT_CONFIG, UNET_CONFIG, _words, caption_vocabulary, load_shipped_pipeline
from .world import (
    _EDIT_TEMPLATES,
    _TO_POS,
    COLOURS,
    KINDS,
    POSITION_PHRASE,
    SIZES,
    Scene,
    caption,
    render_batch,
    sample_edit,
    sample_scene,
)

T2I_DIR = WEIGHTS_DIR / "t2i"
# The resize edit's direction words (the grammar also accepts "bigger").
RESIZE_WORDS = ("larger", "bigger", "smaller")
# UNet input: noisy image (3), source image (3), pixel coordinates (2).
EDIT_IN_CHANNELS = 8
EDIT_UNET_CONFIG = dict(UNET_CONFIG, in_channels=EDIT_IN_CHANNELS)


# --------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _caption_words() -> tuple[str, ...]:
    return tuple(caption_vocabulary())


@functools.lru_cache(maxsize=1)
def instruction_vocabulary() -> tuple[str, ...]:
    """The words edit instructions use that captions never do, sorted ("add", "make", "move", ...)."""
    words: set[str] = set()
    for _, fmt, _ in _EDIT_TEMPLATES:
        words.update(_words(re.sub(r"\{\w+\}", " ", fmt)))  # the fixed words of each template
    for phrase in (*_TO_POS.values(), *POSITION_PHRASE.values()):
        words.update(_words(phrase))
    words.update(COLOURS, KINDS, SIZES, RESIZE_WORDS, ("a", "an"))
    return tuple(sorted(words - set(_caption_words())))


def edit_vocabulary() -> list[str]:
    """Token strings by id: the T2I tokenizer's (specials, caption words), then the instruction words."""
    return [*SPECIAL_TOKENS, *_caption_words(), *instruction_vocabulary()]


def edit_tokenizer():
    """A word-level tokenizer over captions and edit instructions (transformers fast tokenizer).

    Built exactly like :func:`imgalign.shapes.t2i.shapes_tokenizer` with the instruction words
    appended, so a caption gets the same ids from both (the T2I and ShapesCLIP weights depend
    on those ids).
    """
    from .t2i import word_tokenizer

    return word_tokenizer(edit_vocabulary())


# --------------------------------------------------------------------------- model


def build_edit_pipeline(seed: int = 0, init_from: str | Path | None = None):
    """A Shapes edit pipeline: fresh random weights, or initialised from a T2I pipeline directory.

    With ``init_from`` (e.g. the shipped ``imgalign/shapes/weights/t2i``), as InstructPix2Pix
    initialises from Stable Diffusion: every UNet and text-encoder weight is copied; the
    ``conv_in`` weights of the three source-image channels start at zero, so with any source
    the model first predicts exactly the T2I velocity; the embedding rows of the instruction
    words are drawn with std 1.0 (``seed``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines import ShapesEditPipeline, ShapesPipeline

    tokenizer = edit_tokenizer()
    token_ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    if init_from is None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**EDIT_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **token_ids, **TEXT_CONFIG))
        torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        t2i = ShapesPipeline.from_pretrained(str(init_from), torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_config({**t2i.unet.config, "in_channels": EDIT_IN_CHANNELS})
        _copy_unet_with_source_channels(t2i.unet, unet)
        text_config = {**t2i.text_encoder.config.to_dict(), "vocab_size": len(tokenizer), **token_ids}
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_config))
        _copy_text_encoder_with_new_words(t2i.text_encoder, text_encoder, torch.Generator().manual_seed(seed))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(t2i.scheduler.config)
    return ShapesEditPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def shipped_edit_pipeline(**options):
    """``pipelines.load("shapes-edit")`` (an ``imgalign.pipelines`` entry point): the shipped edit model."""
    return load_shipped_pipeline("edit", **options)


def _copy_unet_with_source_channels(t2i_unet, edit_unet) -> None:
    """All T2I weights; ``conv_in`` input channels [RGB, coords] -> [RGB, source = 0, coords]."""
    state = t2i_unet.state_dict()
    weight = state["conv_in.weight"]  # [out, 3 + 2, k, k]
    new = weight.new_zeros(weight.shape[0], EDIT_IN_CHANNELS, *weight.shape[2:])
    new[:, :3] = weight[:, :3]
    new[:, 6:] = weight[:, 3:]
    state["conv_in.weight"] = new
    edit_unet.load_state_dict(state)


def _copy_text_encoder_with_new_words(t2i_text, edit_text, generator: torch.Generator) -> None:
    """All T2I text weights; the embedding rows of the appended words drawn from N(0, 1)."""
    old = t2i_text.get_input_embeddings().weight
    name = next(n for n, p in t2i_text.named_parameters() if p is old)
    state = t2i_text.state_dict()
    n_new = edit_text.get_input_embeddings().weight.shape[0] - old.shape[0]
    fresh = torch.randn(n_new, old.shape[1], generator=generator).to(old.dtype)
    state[name] = torch.cat([old.detach(), fresh])
    edit_text.load_state_dict(state)


# --------------------------------------------------------------------------- data


@dataclass
class EditExamples:
    """``n`` edit triples; sources and targets are rendered with the same per-example jitter."""

    sources: np.ndarray  # uint8 [n, H, W, 3]
    instructions: list[str]
    targets: np.ndarray  # uint8 [n, H, W, 3]
    source_scenes: list[Scene]
    target_scenes: list[Scene]
    jitter_seed: int
    size: int = 32

    def render(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Render ``n`` other scenes (one per example) with the examples' jitter."""
        if len(scenes) != len(self.instructions):
            raise ValueError(f"expected {len(self.instructions)} scenes, got {len(scenes)}")
        return render_batch(list(scenes), self.size, rng=np.random.default_rng(self.jitter_seed))


def sample_edit_in_split(scene: Scene, rng: np.random.Generator, split: str = "train") -> tuple[str, Scene]:
    """:func:`sample_edit`, redrawn while a training edit would create a held-out colour/shape pair."""
    for _ in range(100):
        instruction, target = sample_edit(scene, rng)
        if split != "train" or not target.has_heldout_pair():
            return instruction, target
    raise RuntimeError(f"no training-split edit found for {scene}")  # pragma: no cover


def make_edit_dataset(n: int, seed: int, split: str = "train", size: int = 32) -> EditExamples:
    """``n`` random (source render, instruction, target render) triples from one seed.

    Sources come from ``split``; with ``"train"`` the targets avoid held-out pairs too.
    """
    rng = np.random.default_rng(seed)
    source_scenes = [sample_scene(rng, split=split) for _ in range(n)]  # type: ignore[arg-type]
    edits = [sample_edit_in_split(scene, rng, split) for scene in source_scenes]
    instructions = [instruction for instruction, _ in edits]
    target_scenes = [target for _, target in edits]
    jitter_seed = int(rng.integers(2**31))
    sources = render_batch(source_scenes, size, rng=np.random.default_rng(jitter_seed))
    targets = render_batch(target_scenes, size, rng=np.random.default_rng(jitter_seed))
    return EditExamples(sources, instructions, targets, source_scenes, target_scenes, jitter_seed, size)


def write_edit_sources(folder: str | Path, n: int = 256, seed: int = 0, split: str = "train") -> Path:
    """A folder of source renders + instructions (``metadata.jsonl``) for edit alignment.

    The layout ``imgalign train`` reads for edit models (``data.images``); each line also keeps
    the source caption, which :func:`imgalign.shapes.oracle.judge_edit` needs to judge a result.
    """
    from ..train.data import write_image_folder

    examples = make_edit_dataset(n, seed, split=split)
    extra = [{"source_caption": caption(scene)} for scene in examples.source_scenes]
    return write_image_folder(folder, examples.sources, examples.instructions, extra)


def edit_operation(source: Scene, target: Scene) -> str:
    """Which edit turned ``source`` into ``target``: recolour, resize, move, remove or add."""
    if len(target.shapes) != len(source.shapes):
        return "add" if len(target.shapes) > len(source.shapes) else "remove"
    (old,) = [s for s in source.shapes if s not in target.shapes]
    (new,) = [s for s in target.shapes if s not in source.shapes]
    if old.colour != new.colour:
        return "recolour"
    return "resize" if old.size != new.size else "move"


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------- training


def drop_conditions(
    instructions: list[str],
    sources: torch.Tensor,
    rng: np.random.Generator,
    instruction_dropout: float = 0.05,
    source_dropout: float = 0.05,
    both_dropout: float = 0.05,
) -> tuple[list[str], torch.Tensor]:
    """InstructPix2Pix's conditioning dropout (sec. 3.3): per example, drop only the instruction
    (empty text), only the source (zero image), or both, so the text-only, image-only and
    unconditional velocities all exist for the two-scale guidance."""
    keep = 1 - instruction_dropout - source_dropout - both_dropout
    which = rng.choice(4, size=len(instructions), p=[keep, instruction_dropout, source_dropout, both_dropout])
    no_text, no_source = (which == 1) | (which == 3), (which == 2) | (which == 3)
    instructions = ["" if drop else text for text, drop in zip(instructions, no_text, strict=True)]
    keep_source = torch.from_numpy(~no_source).to(sources.device, sources.dtype).view(-1, 1, 1, 1)
    return instructions, sources * keep_source


def edit_flow_matching_loss(
    pipe, targets: torch.Tensor, sources: torch.Tensor, instructions: list[str], generator: torch.Generator
) -> torch.Tensor:
    """MSE between predicted and true velocity ``noise - target`` at logit-normal noise levels."""
    b = targets.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator)).to(targets.device)
    noise = torch.randn(targets.shape, generator=generator).to(targets.device)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * targets + s * noise
    text = pipe._encode(instructions, targets.device)
    pred = pipe.velocity(x_t, sigma * 1000, text, sources)
    return torch.nn.functional.mse_loss(pred.float(), (noise - targets).float())


def train_edit(
    out_dir: str | Path,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 3e-4,
    seed: int = 0,
    init_from: str | Path | None = T2I_DIR,
    instruction_dropout: float = 0.05,
    source_dropout: float = 0.05,
    both_dropout: float = 0.05,
    ema_decay: float = 0.995,
    log_every: int = 50,
    device: str = "cpu",
) -> Path:
    """Fine-tune from the T2I model (``init_from``; None trains from scratch) and save the EMA
    weights with ``save_pretrained`` (fp16 safetensors), written atomically."""
    from .t2i import fit_pipeline

    pipe = build_edit_pipeline(seed, init_from).to(device)
    generator = torch.Generator().manual_seed(seed)
    drop_rng = np.random.default_rng(seed)

    def step_loss(step: int) -> torch.Tensor:
        examples = make_edit_dataset(batch_size, seed=seed * 1_000_003 + step)
        targets = to_model_space(examples.targets).to(device)
        sources = to_model_space(examples.sources).to(device)
        instructions, sources = drop_conditions(
            examples.instructions, sources, drop_rng, instruction_dropout, source_dropout, both_dropout
        )
        return edit_flow_matching_loss(pipe, targets, sources, instructions, generator)

    return fit_pipeline(pipe, step_loss, out_dir, steps=steps, lr=lr, ema_decay=ema_decay, log_every=log_every,
                        desc="shapes edit")  # fmt: skip


# --------------------------------------------------------------------------- evaluation


def evaluate_edit(
    pipe_dir: str | Path,
    *,
    n: int = 200,
    steps: int = 20,
    guidance: float = 3.0,
    image_guidance: float = 1.5,
    seed: int = 1234,
    device: str = "cpu",
    split: str = "heldout",
) -> dict:
    """The oracle's mean ``overall``, ``edit_applied`` and ``preserved`` on ``n`` edits of ``split`` sources.

    Held-out sources each contain a colour/shape pair never seen in training. ``exact`` is the
    fraction of perfect edits; ``per_operation`` breaks ``overall`` down by edit kind. Returning
    the source unchanged scores 0 (see :func:`imgalign.shapes.oracle.judge_edit`).
    """
    from pipelines import ShapesEditPipeline

    from .oracle import judge_edit

    pipe = ShapesEditPipeline.from_pretrained(str(pipe_dir), torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    examples = make_edit_dataset(n, seed, split=split)
    sources = from_uint8(examples.sources)
    edited = []
    for start in range(0, n, 100):
        chunk = slice(start, min(start + 100, n))
        gens = [torch.Generator().manual_seed(seed + i) for i in range(chunk.start, chunk.stop)]
        edited.append(pipe(
            examples.instructions[chunk], image=sources[chunk], num_inference_steps=steps, guidance_scale=guidance,
            image_guidance_scale=image_guidance, generator=gens, output_type="pt",
        ).images.cpu())  # fmt: skip
    edited = torch.cat(edited)
    judgements = [
        judge_edit(source, instruction, image, scene)
        for source, instruction, image, scene in zip(
            examples.sources, examples.instructions, edited, examples.source_scenes, strict=True
        )
    ]
    operations = [edit_operation(s, t) for s, t in zip(examples.source_scenes, examples.target_scenes, strict=True)]
    per_operation = {
        op: float(np.mean([j.overall for j, o in zip(judgements, operations, strict=True) if o == op]))
        for op in sorted(set(operations))
    }
    return {
        "overall": float(np.mean([j.overall for j in judgements])),
        "edit_applied": float(np.mean([j.edit_applied for j in judgements])),
        "preserved": float(np.mean([j.preserved for j in judgements])),
        "exact": float(np.mean([j.exact for j in judgements])),
        "per_operation": per_operation,
        "n": n,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the Shapes edit model (InstructPix2Pix from the T2I model).")
    parser.add_argument("--out", default="imgalign/shapes/weights/edit")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--init-from", default=str(T2I_DIR), help="T2I pipeline directory to start from")
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation instead of --init-from")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval", type=int, default=0, help="judge this many held-out edits afterwards")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0, help="instruction guidance scale for --eval")
    parser.add_argument("--image-guidance", type=float, default=1.5, help="image guidance scale for --eval")
    args = parser.parse_args()
    out = train_edit(
        args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        init_from=None if args.from_scratch else args.init_from, device=args.device,
    )  # fmt: skip
    print(out)
    if args.eval:
        print(evaluate_edit(out, n=args.eval, steps=args.eval_steps, guidance=args.guidance,
                            image_guidance=args.image_guidance, device=args.device))  # fmt: skip
