"""ImageReward (Xu et al. 2023, ``THUDM/ImageReward``) and VP-Score (ImageReward architecture).

Reproduces ``ImageReward/ImageReward.py`` (``score`` / ``score_gard``):

* image: ``Resize(224, bicubic)`` (shortest side) -> ``CenterCrop(224)`` -> OpenAI CLIP
  mean/std (the reference runs it on PIL images; our tensor path uses the anti-aliased
  bicubic kernel, see :mod:`rewards.preprocess`);
* BLIP ViT-L/16 visual encoder (``models/BLIP/vit.py``: 1024 wide, 24 blocks, 16 heads,
  pre-norm blocks, LayerNorm eps 1e-6, exact GELU, qkv bias) -> all tokens after ``norm``;
* BLIP "med" BERT text encoder with cross-attention in every layer
  (``med_config.json``: 768 hidden, 12 layers, 12 heads, 3072 intermediate, vocab 30524,
  LayerNorm eps 1e-12, exact GELU, *no token-type embeddings*, cross-attention key/value
  projections of width ``encoder_width`` = 1024 = the ViT width), text attention mask
  applied as ``(1 - mask) * -10000``, image tokens fully visible;
* tokenizer: ``bert-base-uncased`` + ``[DEC]`` (bos) + ``[ENC]`` (additional special),
  ``padding="max_length", truncation=True, max_length=35``; the feature is the
  ``[CLS]`` position ``last_hidden_state[:, 0]``;
* MLP 768-1024-128-64-16-1 with dropout and no activations (keys ``mlp.layers.{0,2,4,6,7}``);
* reward = ``(mlp(feature) - 0.16717362830052426) / 1.0333394966054072``.

We build our own compact modules whose parameter names are exactly the released ones
(``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj.*``,
``blip.text_proj.*``, ``mlp.layers.*``): transformers' ``BertModel`` cannot express the
1024-wide cross-attention inputs nor the missing token-type table, so a key mapping onto
it is not possible. The reference loads with ``strict=False``; we fail on any *missing*
key and only warn about unexpected ones (e.g. a persisted ``position_ids`` buffer).

VP-Score (VisionPrefer, arXiv 2404.15100) is registered as the same architecture with a
user-given checkpoint and normalisation constants. ASSUMPTION: its release is reported as
ImageReward-style; neither its key layout nor its mean/std are confirmed from source, so
``vp-score`` requires ``checkpoint=`` and defaults to ``mean=0, std=1`` (raw MLP output).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import preprocess as P
from .aesthetic import AestheticMLP  # ImageReward's head is the LAION aesthetic MLP (same layout)
from .base import Reward, RewardInfo
from .loading import MissingWeightsError, load_state_dict, resolve_dir, resolve_file, unwrap_state_dict

__all__ = ["ImageRewardConfig", "ImageRewardModel", "ImageRewardReward", "build_blip_tokenizer"]

IR_REPO = "THUDM/ImageReward"
IR_FILE = "ImageReward.pt"
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
TOKENIZER_ID = "bert-base-uncased"


@dataclass
class ImageRewardConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30524
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embed_dim: int = 256
    max_length: int = 35

    @classmethod
    def from_med_config(cls, path: str | Path, **overrides) -> ImageRewardConfig:
        """Read the BERT fields of a BLIP ``med_config.json`` (other fields keep defaults)."""
        med = json.loads(Path(path).read_text())
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in med.items() if k in names}
        kw.update(overrides)
        return cls(**kw)


# --- BLIP ViT (names follow models/BLIP/vit.py) ----------------------------------------
class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _ViTMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionTransformer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.vision_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, cfg.vision_width))
        self.blocks = nn.ModuleList(
            [_ViTBlock(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp_ratio) for _ in range(cfg.vision_layers)]
        )
        self.norm = nn.LayerNorm(cfg.vision_width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --- BLIP "med" BERT with cross-attention (names follow models/BLIP/med.py) ------------
class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor, additive_mask: Tensor | None) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(kv)), self._split(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


class _BertSelfOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, inner: int):
        super().__init__()
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: Tensor, kv: Tensor, additive_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, kv, additive_mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, cfg.vision_width)  # encoder_width = ViT width
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: Tensor, text_mask: Tensor, image: Tensor) -> Tensor:
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image, None)  # all image tokens attended (image_atts = 1)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList([_BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BlipTextEncoder(nn.Module):
    """BERT encoder with cross-attention to image tokens; no pooler, no token types."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        # BERT extended mask: (1 - mask) * -10000, broadcast over heads and queries
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = BlipVisionTransformer(cfg)
        self.text_encoder = BlipTextEncoder(cfg)
        # unused by the reward, present in the release (kept so loading is exact)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)


class ImageRewardModel(nn.Module):
    """BLIP + MLP with exactly the released parameter names (``blip.*``, ``mlp.*``)."""

    def __init__(self, cfg: ImageRewardConfig | None = None):
        super().__init__()
        self.config = cfg or ImageRewardConfig()
        self.blip = _Blip(self.config)
        self.mlp = AestheticMLP(self.config.hidden_size)

    def raw(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Un-normalised MLP output ``[B]`` for preprocessed pixels and tokens."""
        image_embeds = self.blip.visual_encoder(pixel_values)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        return self.mlp(hidden[:, 0].float()).squeeze(-1)

    def load_released(self, state_dict: dict[str, Tensor], what: str = "ImageReward checkpoint") -> list[str]:
        """Load a released state dict: missing keys raise, unexpected keys warn (returned)."""
        sd = {k: v for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
        result = self.load_state_dict(sd, strict=False)
        if result.missing_keys:
            keys = result.missing_keys
            raise ValueError(
                f"{what}: {len(keys)} missing key(s) for the ImageReward layout "
                f"(blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*): "
                + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            )
        if result.unexpected_keys:
            warnings.warn(f"{what}: ignored {len(result.unexpected_keys)} unexpected key(s), e.g. "
                          f"{result.unexpected_keys[:4]}", stacklevel=2)
        return list(result.unexpected_keys)


def build_blip_tokenizer(path_or_repo: str = TOKENIZER_ID):
    """``bert-base-uncased`` tokenizer + ``[DEC]`` bos + ``[ENC]`` (BLIP ``init_tokenizer``)."""
    from transformers import BertTokenizer

    d = resolve_dir(path_or_repo, "tokenizer", allow_patterns=("*.txt", "*.json"), required="vocab.txt")
    tok = BertTokenizer.from_pretrained(str(d))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(Reward):
    def __init__(self, model: ImageRewardModel, tokenizer, mean: float = IR_MEAN, std: float = IR_STD,
                 antialias: bool = True, name: str = "imagereward", source: str = "", standardized: bool = True):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean, self.std = float(mean), float(std)
        self.antialias = antialias
        self.info = RewardInfo(
            name=name,
            inputs=("images", "prompts"),
            source=source or "THUDM/ImageReward (ImageReward.pt), BLIP ViT-L/16 + BERT cross-attention + MLP",
            score_range=(-3.0, 3.0),
            # the output is already standardised with the published constants (when known)
            mean=0.0 if standardized else None,
            std=1.0 if standardized else None,
            extra={"published_mean": self.mean, "published_std": self.std},
        )

    @classmethod
    def from_options(cls, checkpoint: str = IR_REPO, filename: str = IR_FILE, tokenizer=TOKENIZER_ID,
                     med_config: str | None = None, config: ImageRewardConfig | dict | None = None,
                     mean: float = IR_MEAN, std: float = IR_STD, antialias: bool = True, name: str = "imagereward",
                     dtype: torch.dtype | None = None, standardized: bool = True):
        if isinstance(config, dict):
            config = ImageRewardConfig(**config)
        if config is None:
            config = ImageRewardConfig.from_med_config(med_config) if med_config else ImageRewardConfig()
        path = resolve_file(checkpoint, filename, "checkpoint")
        model = ImageRewardModel(config)
        model.load_released(unwrap_state_dict(load_state_dict(path)), f"{name} checkpoint {path}")
        if dtype is not None:
            model.to(dtype)
        tok = build_blip_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return cls(model, tok, mean, std, antialias, name, source=f"{name} from {path}", standardized=standardized)

    def pixels(self, images: Tensor) -> Tensor:
        size = self.model.config.image_size
        x = P.resize_shortest_and_center_crop(images, size, mode="bicubic", antialias=self.antialias, clamp=True, offset="round")
        return P.normalize(x, P.CLIP_MEAN, P.CLIP_STD)

    def _score(self, images: Tensor, prompts: list[str], **cond) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.model.config.max_length, return_tensors="pt")
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        raw = self.model.raw(self.pixels(images).to(dtype), tok["input_ids"].to(dev), tok["attention_mask"].to(dev))
        return (raw - self.mean) / self.std


def imagereward(**options) -> ImageRewardReward:
    return ImageRewardReward.from_options(**options)


def vp_score(checkpoint: str | None = None, filename: str | None = None, mean: float = 0.0, std: float = 1.0,
             **options) -> ImageRewardReward:
    """VP-Score as an ImageReward-architecture model (see the module docstring's assumption)."""
    if checkpoint is None:
        raise MissingWeightsError(
            "vp-score needs checkpoint=/path/to/vp_score.pt (an ImageReward-layout state dict: "
            "blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*); no hub location is confirmed"
        )
    return ImageRewardReward.from_options(checkpoint=checkpoint, filename=filename, mean=mean, std=std,
                                          name="vp-score", standardized=(mean, std) != (0.0, 1.0), **options)
