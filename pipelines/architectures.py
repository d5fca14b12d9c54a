"""Published diffusion architectures as in-code configs, buildable with random weights.

Why: tests need the *real* diffusers classes at tiny sizes without touching the
hub, and the benchmark needs full-size models (same shapes and FLOPs as the
published checkpoints) with random weights, built straight on the GPU. Every
config below is a plain dict in the format of the model's ``config.json`` (with
``_class_name``), so it can be diffed against the published file.

Sources (full size): SD1.5 = runwayml/stable-diffusion-v1-5, SD2-v =
stabilityai/stable-diffusion-2-1, SDXL = stabilityai/stable-diffusion-xl-base-1.0,
SD3 = stabilityai/stable-diffusion-3.5-medium, FLUX = black-forest-labs/FLUX.1-dev,
Kontext = black-forest-labs/FLUX.1-Kontext-dev, IP2P = timbrooks/instruct-pix2pix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from pipelines.tokenizers import clip_tokenizer, t5_tokenizer

__all__ = [
    "FAMILIES",
    "SIZES",
    "FULL_CONFIGS",
    "TINY_CONFIGS",
    "SCHEDULER_CONFIGS",
    "PUBLISHED_DENOISER_PARAMS",
    "build_pipeline",
    "build_denoiser",
    "count_parameters",
    "random_prompt_embeds",
]

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux", "flux-kontext", "instruct-pix2pix")
SIZES = ("tiny", "full")

# =============================================================================================
# Schedulers: the published scheduler_config.json of each model (same for tiny and full).
# =============================================================================================

# runwayml/stable-diffusion-v1-5 ships PNDM; DDIM with the same betas is the usual drop-in
# (and what the brief asks for). Betas/offset/alpha-to-one are the published SD1.x values.
_SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json: DDIM, v_prediction, same betas.
# The published file has no timestep_spacing (diffusers default "leading"); "trailing" is used
# here deliberately (recommended for v-prediction, and requested by the project).
_SD2_SCHEDULER = {**_SD15_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}
# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json.
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# black-forest-labs/FLUX.1-dev (and FLUX.1-Kontext-dev) scheduler/scheduler_config.json.
_FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# timbrooks/instruct-pix2pix: EulerAncestral with the SD1.x betas and steps_offset 1 (as the model
# card's usage). Not confirmed from the file itself: whether it sets timestep_spacing (left at the
# diffusers default, "linspace").
_IP2P_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": _SD15_SCHEDULER,
    "sd2-v": _SD2_SCHEDULER,
    "sdxl": _SDXL_SCHEDULER,
    "sd3": _SD3_SCHEDULER,
    "flux": _FLUX_SCHEDULER,
    "flux-kontext": _FLUX_SCHEDULER,
    "instruct-pix2pix": _IP2P_SCHEDULER,
}

# =============================================================================================
# Full-size denoisers and VAEs (published config.json values).
# =============================================================================================

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

# runwayml/stable-diffusion-v1-5 unet/config.json (859.5M parameters).
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
# stabilityai/stable-diffusion-2-1 unet/config.json (768px, v-prediction; 865.9M parameters).
SD2_UNET = {
    **SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567B parameters).
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 time ids + 1280 pooled text
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "upcast_attention": False,
}
# timbrooks/instruct-pix2pix unet/config.json: the SD1.5 UNet with 8 input channels
# (4 noisy latents + 4 image latents).
IP2P_UNET = {**SD15_UNET, "in_channels": 8}

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X; ~2.24B parameters).
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
# black-forest-labs/FLUX.1-dev transformer/config.json (11.9B parameters). FLUX.1-Kontext-dev
# publishes the same transformer config.
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

_VAE_BASE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
}
# runwayml/stable-diffusion-v1-5 vae/config.json (also timbrooks/instruct-pix2pix).
SD15_VAE = {**_VAE_BASE, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215}
# stabilityai/stable-diffusion-2-1 vae/config.json: same weights layout, 768px.
SD2_VAE = {**SD15_VAE, "sample_size": 768}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json.
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# stabilityai/stable-diffusion-3.5-medium vae/config.json: 16 latent channels, no quant convs.
SD3_VAE = {
    **_VAE_BASE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# black-forest-labs/FLUX.1-dev vae/config.json.
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

FULL_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE},
    "sd2-v": {"unet": SD2_UNET, "vae": SD2_VAE},
    "sdxl": {"unet": SDXL_UNET, "vae": SDXL_VAE},
    "sd3": {"transformer": SD35_MEDIUM_TRANSFORMER, "vae": SD3_VAE},
    "flux": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE},
    "flux-kontext": {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE},
    "instruct-pix2pix": {"unet": IP2P_UNET, "vae": SD15_VAE},
}

#: Published (or, where marked, computed-from-config) denoiser parameter counts, for sanity tests.
PUBLISHED_DENOISER_PARAMS: dict[str, float] = {
    "sd15": 859.52e6,
    "sd2-v": 865.91e6,
    "sdxl": 2.567e9,
    # Not an exact published figure: the diffusers config gives 2.243B; Stability's model card says
    # "2.5B parameters" for SD3.5 Medium (MMDiT-X), which is not a count of this module alone.
    "sd3": 2.24e9,
    "flux": 11.9e9,
    "flux-kontext": 11.9e9,
    "instruct-pix2pix": 859.53e6,
}

# =============================================================================================
# Tiny configs: same classes and block structure, sizes in the spirit of diffusers' fast tests.
# VAEs keep 4 levels so vae_scale_factor is the real 8: a 64x64 image is an 8x8 latent.
# =============================================================================================

_TINY_CLIP_MERGES = 500  # vocab 512 + 500 + 2 = 1014; <|startoftext|>=1012, <|endoftext|>=1013
_TINY_CLIP_VOCAB = 512 + _TINY_CLIP_MERGES + 2

_TINY_CLIP_TEXT = {  # CLIP ViT-L/14 text tower stand-in (hidden 768 -> 32)
    "vocab_size": _TINY_CLIP_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,  # >= 2: SDXL/SD3 read hidden_states[-2]
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": _TINY_CLIP_VOCAB - 2,
    "eos_token_id": _TINY_CLIP_VOCAB - 1,  # pooling reads the first <|endoftext|>
    "pad_token_id": _TINY_CLIP_VOCAB - 1,
}
_TINY_CLIP_G_TEXT = {  # OpenCLIP bigG text tower stand-in (hidden 1280 -> 48), distinct width on purpose
    **_TINY_CLIP_TEXT,
    "hidden_size": 48,
    "intermediate_size": 96,
    "projection_dim": 48,
    "hidden_act": "gelu",
}
_TINY_T5 = {  # T5-v1.1-XXL encoder stand-in (d_model 4096 -> 96 >= 32 + 48, as 4096 >= 768 + 1280)
    "vocab_size": None,  # filled from the tokenizer
    "d_model": 96,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

_TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
_TINY_VAE_16 = {
    **_TINY_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_TINY_SD_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
_TINY_SD2_UNET = {
    **_TINY_SD_UNET,
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "upcast_attention": True,
}
_TINY_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "cross_attention_dim": 32 + 48,  # concat of both text encoders' hidden states
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,  # time ids + text_encoder_2 projection
    "norm_num_groups": 8,
}
_TINY_SD3_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 96,
    "caption_projection_dim": 32,  # = heads * head_dim, as 1536 = 24 * 64
    "pooled_projection_dim": 32 + 48,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}
_TINY_FLUX_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 96,
    "pooled_projection_dim": 32,  # CLIP-L pooled output (hidden size)
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
}

_TINY_SD3_VAE = {**_TINY_VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
_TINY_FLUX_VAE = {**_TINY_VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}

TINY_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": _TINY_SD_UNET, "vae": _TINY_VAE},
    "sd2-v": {"unet": _TINY_SD2_UNET, "vae": _TINY_VAE},
    "sdxl": {"unet": _TINY_SDXL_UNET, "vae": {**_TINY_VAE, "scaling_factor": 0.13025}},
    "sd3": {"transformer": _TINY_SD3_TRANSFORMER, "vae": _TINY_SD3_VAE},
    "flux": {"transformer": _TINY_FLUX_TRANSFORMER, "vae": _TINY_FLUX_VAE},
    "flux-kontext": {"transformer": _TINY_FLUX_TRANSFORMER, "vae": _TINY_FLUX_VAE},
    "instruct-pix2pix": {"unet": {**_TINY_SD_UNET, "in_channels": 8}, "vae": _TINY_VAE},
}


# =============================================================================================
# Family wiring
# =============================================================================================


@dataclass(frozen=True)
class _Family:
    pipeline: str
    denoiser: str  # component name: "unet" or "transformer"
    # (component name, kind) for each text encoder; kinds: clip_l, clip_l_proj, clip_g_proj, t5
    text_encoders: tuple[tuple[str, str], ...]
    extra_kwargs: tuple[tuple[str, Any], ...] = ()


_SD_EXTRA = (
    ("safety_checker", None),
    ("feature_extractor", None),
    ("image_encoder", None),
    ("requires_safety_checker", False),
)
_FAMILY_SPECS: dict[str, _Family] = {
    "sd15": _Family("StableDiffusionPipeline", "unet", (("text_encoder", "clip_l"),), _SD_EXTRA),
    "sd2-v": _Family("StableDiffusionPipeline", "unet", (("text_encoder", "clip_l"),), _SD_EXTRA),
    "sdxl": _Family(
        "StableDiffusionXLPipeline",
        "unet",
        (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g_proj")),
        (("image_encoder", None), ("feature_extractor", None), ("add_watermarker", False)),
    ),
    "sd3": _Family(
        "StableDiffusion3Pipeline",
        "transformer",
        (("text_encoder", "clip_l_proj"), ("text_encoder_2", "clip_g_proj"), ("text_encoder_3", "t5")),
        (("image_encoder", None), ("feature_extractor", None)),
    ),
    "flux": _Family(
        "FluxPipeline",
        "transformer",
        (("text_encoder", "clip_l"), ("text_encoder_2", "t5")),
        (("image_encoder", None), ("feature_extractor", None)),
    ),
    "flux-kontext": _Family(
        "FluxKontextPipeline",
        "transformer",
        (("text_encoder", "clip_l"), ("text_encoder_2", "t5")),
        (("image_encoder", None), ("feature_extractor", None)),
    ),
    "instruct-pix2pix": _Family(
        "StableDiffusionInstructPix2PixPipeline", "unet", (("text_encoder", "clip_l"),), _SD_EXTRA
    ),
}


def _spec(family: str) -> _Family:
    if family not in _FAMILY_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _FAMILY_SPECS[family]


def _configs(family: str, size: str) -> dict[str, dict[str, Any]]:
    if size == "tiny":
        return TINY_CONFIGS[family]
    if size == "full":
        return FULL_CONFIGS[family]
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (no fp32 copy of a 12B model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _from_config(config: dict[str, Any]) -> Any:
    cls = getattr(diffusers, config["_class_name"])
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(init)


def _tiny_text_encoder(kind: str, vocab_size: int) -> transformers.PreTrainedModel:
    if kind == "t5":
        return transformers.T5EncoderModel(transformers.T5Config(**{**_TINY_T5, "vocab_size": vocab_size}))
    cfg = _TINY_CLIP_G_TEXT if kind == "clip_g_proj" else _TINY_CLIP_TEXT
    config = transformers.CLIPTextConfig(**cfg)
    if kind == "clip_l":
        return transformers.CLIPTextModel(config)
    return transformers.CLIPTextModelWithProjection(config)


def _tokenizer_name(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def build_denoiser(
    family: str,
    size: str = "full",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> torch.nn.Module:
    """Only the UNet/transformer; ``device="meta"`` counts parameters without allocating."""
    spec = _spec(family)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        return _from_config(_configs(family, size)[spec.denoiser])


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameter elements; works on ``meta`` modules (nothing is read)."""
    return sum(p.numel() for p in module.parameters())


def build_pipeline(
    family: str,
    size: str = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    text_encoders: bool | None = None,
) -> DiffusionPipeline:
    """Build a complete diffusers pipeline of ``family`` with random weights, offline.

    ``size="tiny"``: real classes at toy widths, with real (truncated) CLIP BPE and a
    small T5 Unigram tokenizer, small enough for unit tests on CPU with text prompts.
    Built on CPU in fp32 (so weights do not depend on ``device``), then moved.

    ``size="full"``: the published denoiser/VAE configs, allocated directly on
    ``device`` in ``dtype``. Text encoders and tokenizers are ``None`` (pass
    :func:`random_prompt_embeds`), unless ``text_encoders=True`` is asked for, which is
    only supported at tiny size. ``text_encoders=False`` at tiny size drops them too,
    to exercise the precomputed-embedding path cheaply.

    Each component is constructed right after ``torch.manual_seed(seed + i)``, so the
    result is deterministic for a given seed (and device, for full size).
    """
    spec = _spec(family)
    configs = _configs(family, size)
    if text_encoders is None:
        text_encoders = size == "tiny"
    if text_encoders and size != "tiny":
        raise ValueError("full-size text encoders are not built here; use random_prompt_embeds()")

    build_device = torch.device("cpu") if size == "tiny" else torch.device(device)
    build_dtype = torch.float32 if size == "tiny" else dtype
    components: dict[str, Any] = dict(spec.extra_kwargs)
    components["scheduler"] = _from_config(SCHEDULER_CONFIGS[family])

    with torch.device(build_device), _default_dtype(build_dtype):
        torch.manual_seed(seed)
        components[spec.denoiser] = _from_config(configs[spec.denoiser])
        torch.manual_seed(seed + 1)
        components["vae"] = _from_config(configs["vae"])
        for i, (name, kind) in enumerate(spec.text_encoders):
            tok_name = _tokenizer_name(name)
            if not text_encoders:
                components[name] = components[tok_name] = None
                continue
            tokenizer = t5_tokenizer() if kind == "t5" else clip_tokenizer(_TINY_CLIP_MERGES)
            torch.manual_seed(seed + 2 + i)
            components[name] = _tiny_text_encoder(kind, len(tokenizer)).eval()
            components[tok_name] = tokenizer

    for component in components.values():
        if isinstance(component, torch.nn.Module):
            # nn.Module.to, not ModelMixin.to: the latter warns about "modules to keep in fp32"
            # on every dtype cast, even when that list is empty (diffusers 0.42).
            torch.nn.Module.to(component, device=device, dtype=dtype)
    pipe = getattr(diffusers, spec.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompt_shapes(family: str, pipe: DiffusionPipeline) -> tuple[tuple[int, int], int | None, bool]:
    """(sequence length, embedding width), pooled width or None, whether CFG negatives apply."""
    clip_len = pipe.tokenizer.model_max_length if getattr(pipe, "tokenizer", None) is not None else 77
    if family in ("sd15", "sd2-v", "instruct-pix2pix"):
        return (clip_len, pipe.unet.config.cross_attention_dim), None, True
    if family == "sdxl":
        cfg = pipe.unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return (clip_len, cfg.cross_attention_dim), pooled, True
    cfg = pipe.transformer.config
    if family == "sd3":
        # CLIP-L/G hidden states (padded to T5 width) followed by T5's 256 tokens (pipeline default).
        return (clip_len + 256, cfg.joint_attention_dim), cfg.pooled_projection_dim, True
    if family in ("flux", "flux-kontext"):
        return (512, cfg.joint_attention_dim), cfg.pooled_projection_dim, False  # T5, max_sequence_length 512
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def random_prompt_embeds(
    family: str, pipe: DiffusionPipeline, batch_size: int, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random text conditioning with the exact shapes ``pipe.__call__`` expects.

    Lets the benchmark (whose full-size pipelines have no text encoders) skip
    prompt encoding. Shapes come from the denoiser config, so they are the
    published ones at full size (SD1.5 (B,77,768); SDXL (B,77,2048)+(B,1280);
    SD3 (B,333,4096)+(B,2048); FLUX (B,512,4096)+(B,768)). Families that use
    classifier-free guidance also get ``negative_*`` tensors, so that no
    tokenizer is needed for the empty negative prompt; FLUX (guidance-distilled)
    does not.
    """
    (seq, width), pooled, with_negative = _prompt_shapes(family, pipe)
    denoiser = getattr(pipe, _spec(family).denoiser)
    dtype, device = denoiser.dtype, denoiser.device
    gen = torch.Generator("cpu").manual_seed(seed)

    def sample(*shape: int) -> torch.Tensor:
        if device.type == "meta":
            return torch.empty(*shape, dtype=dtype, device=device)
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    out = {"prompt_embeds": sample(batch_size, seq, width)}
    if pooled is not None:
        out["pooled_prompt_embeds"] = sample(batch_size, pooled)
    if with_negative:
        out["negative_prompt_embeds"] = sample(batch_size, seq, width)
        if pooled is not None:
            out["negative_pooled_prompt_embeds"] = sample(batch_size, pooled)
    return out
