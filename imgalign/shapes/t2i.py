"""Build and train the Shapes text-to-image model (a :class:`pipelines.ShapesPipeline`).

Rectified flow in pixel space (Liu et al. 2023; SD3's logit-normal timestep density,
Esser et al. 2024 sec. 3.1): ``x_t = (1 - s) x0 + s eps``, the UNet predicts ``eps - x0``.
Scenes are drawn fresh every step from the training split of the world (the held-out
colour/shape pairs never appear), 10% of captions are dropped for classifier-free guidance.

Two choices make attributes learnable at this size (measured in trials): pixel-coordinate
input channels (position words otherwise stay at chance) and a unit-variance token-embedding
initialisation (with CLIP's 0.02, "left" and "right" start nearly identical and never
separate).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from .world import N_CAPTION_TEMPLATES, caption, make_dataset, sample_scene

MAX_TOKENS = 48

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=5,  # RGB + (x, y) coordinates
    out_channels=3,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS)


def caption_vocabulary() -> list[str]:
    """Every word the caption templates can produce (collected from the grammar itself)."""
    rng = np.random.default_rng(0)
    words: set[str] = set()
    for _ in range(3000):
        scene = sample_scene(rng)
        for template in range(N_CAPTION_TEMPLATES):
            words.update(_words(caption(scene, template=template)))
    return sorted(words)


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " , ").replace(".", " ").split()


SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_tokenizer(tokens: list[str]):
    """A word-level transformers fast tokenizer whose token ``i`` is ``tokens[i]`` (specials first).

    Lower-cases, splits on whitespace and punctuation, wraps every text in ``<bos> ... <eos>``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    backend.normalizer = normalizers.Lowercase()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=MAX_TOKENS,
    )  # fmt: skip


def shapes_tokenizer():
    """A word-level tokenizer over the caption vocabulary, as a transformers fast tokenizer."""
    return word_tokenizer([*SPECIAL_TOKENS, *caption_vocabulary()])


def build_shapes_pipeline(seed: int = 0):
    """A freshly initialised Shapes pipeline (random weights, unit-variance token embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines import ShapesPipeline

    tokenizer = shapes_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **TEXT_CONFIG,
    )  # fmt: skip
    text_encoder = CLIPTextModel(text_config)
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return ShapesPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def load_pipeline(directory: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  **options):  # fmt: skip
    """A Shapes pipeline directory as an adapter, fp32 on the CPU unless told otherwise, progress bars off."""
    import pipelines

    adapter = pipelines.load(str(directory), dtype=dtype or torch.float32, device=device or "cpu", **options)
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


def load_shipped_pipeline(model: str = "t2i", **options):
    """A shipped Shapes pipeline (``t2i`` or ``edit``) from ``weights/``: see :func:`load_pipeline`."""
    from .manifest import WEIGHTS_DIR

    if model not in ("t2i", "edit"):
        raise ValueError(f"no shipped Shapes pipeline {model!r}; choose t2i or edit")
    return load_pipeline(WEIGHTS_DIR / model, **options)


def shipped_t2i_pipeline(**options):
    """``pipelines.load("shapes")`` (an ``imgalign.pipelines`` entry point): the shipped T2I model."""
    return load_shipped_pipeline("t2i", **options)


def flow_matching_loss(pipe, images: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """MSE between predicted and true velocity at logit-normal noise levels."""
    b = images.shape[0]
    sigma = torch.sigmoid(torch.randn(b, generator=generator)).to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * images + s * noise
    text = pipe._encode(captions, images.device)
    pred = pipe.velocity(x_t, sigma * 1000, text)
    return torch.nn.functional.mse_loss(pred.float(), (noise - images).float())


def fit_pipeline(pipe, step_loss, out_dir: str | Path, *, steps: int, lr: float, ema_decay: float = 0.995,
                 log_every: int = 50, desc: str = "shapes") -> Path:  # fmt: skip
    """The training loop the Shapes generators share; saves the EMA weights atomically.

    ``step_loss(step) -> loss`` draws that step's batch and returns its loss. AdamW on the UNet
    and text encoder, linear warm-up then cosine decay to 10% of the peak, gradient clipping at
    1, an EMA with warm-up (``min(decay, (1 + k) / (10 + k))``); the EMA weights are saved with
    ``save_pretrained`` as fp16 safetensors.
    """
    from tqdm.auto import tqdm
    from ..train.loop import plain_step

    from imgalign.io import atomic_directory

    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
    )
    ema_unet, ema_text = copy.deepcopy(pipe.unet).requires_grad_(False), copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    start, running = time.time(), []
    for step in (bar := tqdm(range(steps), desc=desc, unit="step")):
        loss = step_loss(step)
        plain_step(loss, params, optimizer, schedule)
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, pipe.unet), (ema_text, pipe.text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - decay)
        running.append(loss.item())
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(running[-log_every:]):.4f}", min=f"{(time.time() - start) / 60:.1f}")
    pipe.unet, pipe.text_encoder = ema_unet, ema_text
    pipe.to("cpu", torch.float16)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def train_t2i(
    out_dir: str | Path,
    *,
    steps: int = 1200,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.995,
    log_every: int = 50,
    device: str = "cpu",
) -> Path:
    """Train from scratch and save the EMA weights with ``save_pretrained`` (fp16 safetensors)."""
    pipe = build_shapes_pipeline(seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    drop_rng = np.random.default_rng(seed)

    def step_loss(step: int) -> torch.Tensor:
        images, captions, _ = make_dataset(batch_size, seed=seed * 1_000_003 + step)
        x0 = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)
        captions = [c if drop_rng.random() >= caption_dropout else "" for c in captions]
        return flow_matching_loss(pipe, x0, captions, generator)

    return fit_pipeline(pipe, step_loss, out_dir, steps=steps, lr=lr, ema_decay=ema_decay, log_every=log_every,
                        desc="shapes t2i")  # fmt: skip


def evaluate_t2i(pipe_dir: str | Path, *, n_prompts: int = 300, steps: int = 20, guidance: float = 3.0,
                 seed: int = 1234, device: str = "cpu", split: str = "heldout") -> dict:
    """Oracle summary of one image per prompt of a prompt set (fixed seeds)."""
    from pipelines import ShapesPipeline

    from .oracle import judge, summarize
    from .world import prompt_set

    pipe = ShapesPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(split)[:n_prompts]
    images = []
    for start in range(0, len(prompts), 100):
        chunk = prompts[start : start + 100]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt").images.cpu())
    return summarize(judge(torch.cat(images), prompts))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the Shapes text-to-image model.")
    parser.add_argument("--out", default="imgalign/shapes/weights/t2i")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval", type=int, default=0, help="judge this many held-out prompts afterwards")
    args = parser.parse_args()
    out = train_t2i(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr, device=args.device)
    print(out)
    if args.eval:
        print(evaluate_t2i(out, n_prompts=args.eval, device=args.device))
