"""CLIP score (text-image) and CLIP-I (image-image) similarity over open_clip models.

Reproduces:

* open_clip's evaluation preprocessing (``open_clip.image_transform(is_train=False)``):
  ``resize_mode`` ``"shortest"`` = ``Resize(size, bicubic)`` + ``CenterCrop(size)``,
  ``"longest"`` = ``ResizeMaxSize`` + zero pad, ``"squash"`` = resize to ``size x size``;
  mean/std/interpolation/resize mode come from the pretrained tag's config
  (``open_clip.get_pretrained_cfg``), OpenAI CLIP constants otherwise. The reference runs
  on PIL images; the tensor path uses the anti-aliased bicubic kernel (see
  :mod:`rewards.preprocess`), checked against the PIL pixels on photographs in tests.
* CLIP score = cosine of the L2-normalised image and text embeddings, optionally times
  100 (``scale=100``: CLIP-T / CLIP-I as in DreamBench / DreamBench++ ``metrics/``).

Loading: the model is built with ``open_clip.create_model(arch, pretrained=None)`` (random
weights, never a download) and the weights are loaded over it from ``checkpoint`` (a
local file, or ``"hub-repo-id"`` + ``filename``) or, for a ``pretrained`` tag, from the
file that tag points to in the Hugging Face cache. ``arch`` may also be a dict (an
open_clip model config) to build custom/tiny models. OpenAI tags use QuickGELU, read from
the tag's config (``quick_gelu`` overrides).
Text uses open_clip's tokenizer for the arch (``SimpleTokenizer`` BPE, shipped with
open_clip, works offline).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import preprocess as P
from .base import Reward, RewardInfo
from .loading import MissingWeightsError, load_into, load_state_dict, resolve_file, unwrap_state_dict

__all__ = ["ClipImageSimilarity", "ClipScore", "OpenClipEncoder", "build_open_clip"]

_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _pretrained_file(arch: str, pretrained: str) -> str:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    hub = cfg.get("hf_hub") if cfg else None
    if not hub:
        raise MissingWeightsError(
            f"open_clip tag {arch}/{pretrained} has no hub file; pass checkpoint=/path/to/weights"
        )
    parts = hub.strip("/").split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    errors = []
    for name in [filename] if filename else _HF_FILES:
        try:
            return str(resolve_file(repo, name, "checkpoint"))
        except MissingWeightsError as err:
            errors.append(str(err))
    raise MissingWeightsError(errors[0])


def build_open_clip(
    arch: str | dict = "ViT-B-32",
    pretrained: str | None = None,
    checkpoint: str | None = None,
    filename: str | None = None,
    quick_gelu: bool | None = None,
    load_weights: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build an open_clip model without downloading and load weights over it.

    Returns ``(model, preprocess_cfg)``. ``load_weights=False`` keeps random weights (tests).
    """
    import open_clip

    pcfg: dict[str, Any] = {}
    if pretrained and isinstance(arch, str):
        pcfg = dict(open_clip.get_pretrained_cfg(arch, pretrained) or {})
        if not pcfg:
            raise ValueError(f"unknown open_clip pretrained tag {pretrained!r} for {arch}; "
                             f"known: {open_clip.list_pretrained_tags_by_model(arch)}")
    qg = bool(pcfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
    path = None
    if load_weights:  # find the file before building a (possibly huge) model
        if checkpoint is not None:
            path = resolve_file(checkpoint, filename, "checkpoint")
        elif pretrained is not None and isinstance(arch, str):
            path = _pretrained_file(arch, pretrained)
        else:
            raise MissingWeightsError(
                "no weights given: pass checkpoint=/path/to/weights (or a hub repo id + filename=...), "
                "or an open_clip pretrained=tag whose file is in the Hugging Face cache"
            )
    if isinstance(arch, dict):
        cfg = dict(arch)
        model = open_clip.model.CLIP(**cfg, quick_gelu=qg)
        image_size = cfg["vision_cfg"].get("image_size", 224)
    else:
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=qg)
        image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    preprocess_cfg = {
        "size": image_size,
        "mean": tuple(pcfg.get("mean", P.CLIP_MEAN)),
        "std": tuple(pcfg.get("std", P.CLIP_STD)),
        "interpolation": pcfg.get("interpolation", "bicubic"),
        "resize_mode": pcfg.get("resize_mode", "shortest"),
        "clamp": True,  # the open_clip reference resizes PIL images (8-bit, clipped)
    }
    if load_weights:
        sd = unwrap_state_dict(load_state_dict(path))
        load_into(model, sd, f"open_clip {arch if isinstance(arch, str) else 'custom'} from {path}",
                  ignore_unexpected=("position_ids",))
    model.eval()
    return model, preprocess_cfg


def _open_clip_tokenizer(arch, context_length: int):
    import open_clip

    if isinstance(arch, str):
        try:
            return open_clip.get_tokenizer(arch)
        except Exception as err:
            raise MissingWeightsError(
                f"tokenizer for {arch} unavailable offline ({type(err).__name__}); pass tokenizer=<callable>"
            ) from None
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


class OpenClipEncoder(nn.Module):
    """An open_clip model plus its tensor preprocessing and tokenizer."""

    def __init__(self, model: nn.Module, preprocess_cfg: dict[str, Any], tokenizer=None, arch=None,
                 antialias: bool = True):
        super().__init__()
        self.model = model
        self.preprocess_cfg = dict(preprocess_cfg)
        self.antialias = antialias
        ctx = getattr(model, "context_length", 77)
        # tokenizer=False: image-only use, no tokenizer needed
        self.tokenizer = None if tokenizer is False else (tokenizer or _open_clip_tokenizer(arch, ctx))

    def pixels(self, images: Tensor) -> Tensor:
        c = self.preprocess_cfg
        size, mode = c["size"], c.get("interpolation", "bicubic")
        rm, clamp = c.get("resize_mode", "shortest"), c.get("clamp", True)
        if rm == "shortest":
            x = P.resize_shortest_and_center_crop(images, size, mode=mode, antialias=self.antialias, clamp=clamp)
        elif rm == "longest":
            x = P.resize_longest_and_pad(images, size, mode=mode, antialias=self.antialias, clamp=clamp)
        elif rm == "squash":
            x = P.resize(images, (size, size), mode=mode, antialias=self.antialias, clamp=clamp)
        else:
            raise ValueError(f"unknown resize_mode {rm!r}")
        return P.normalize(x, c["mean"], c["std"])

    def encode_image(self, images: Tensor) -> Tensor:
        x = self.pixels(images).to(self._dtype())
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts).to(self._device())
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def _device(self):
        return next(self.model.parameters()).device

    def _dtype(self):
        return next(self.model.parameters()).dtype


class ClipScore(Reward):
    """``scale * cos(image, text)`` with an open_clip model (CLIP-T when ``scale=100``)."""

    def __init__(self, encoder: OpenClipEncoder, scale: float = 1.0, name: str = "clip", source: str = ""):
        super().__init__()
        self.encoder = encoder
        self.scale = float(scale)
        self.info = RewardInfo(
            name=name,
            inputs=("images", "prompts"),
            source=source or "open_clip cosine similarity (Radford et al. 2021; Hessel et al. 2021)",
            score_range=(-self.scale, self.scale),
        )

    @classmethod
    def from_options(cls, arch: str | dict = "ViT-B-32", pretrained: str | None = "openai", checkpoint=None,
                     filename=None, scale: float = 1.0, tokenizer=None, quick_gelu=None, load_weights=True,
                     antialias: bool = True, name: str = "clip"):
        model, pcfg = build_open_clip(arch, pretrained, checkpoint, filename, quick_gelu, load_weights)
        return cls(OpenClipEncoder(model, pcfg, tokenizer, arch, antialias), scale=scale, name=name)

    def _score(self, images: Tensor, prompts: list[str], **cond) -> Tensor:
        img = self.encoder.encode_image(images)
        txt = self.encoder.encode_text(prompts)
        return self.scale * (img * txt).sum(-1)


class ClipImageSimilarity(Reward):
    """``scale * cos(image, reference)`` of open_clip image embeddings (CLIP-I)."""

    def __init__(self, encoder: OpenClipEncoder, scale: float = 1.0, name: str = "clip-i"):
        super().__init__()
        self.encoder = encoder
        self.scale = float(scale)
        self.info = RewardInfo(
            name=name,
            inputs=("images", "reference_images"),
            source="open_clip image-image cosine (CLIP-I, DreamBench / DreamBench++ metrics)",
            score_range=(-self.scale, self.scale),
        )

    @classmethod
    def from_options(cls, arch="ViT-B-32", pretrained="openai", checkpoint=None, filename=None, scale=1.0,
                     quick_gelu=None, load_weights=True, antialias=True, name="clip-i"):
        model, pcfg = build_open_clip(arch, pretrained, checkpoint, filename, quick_gelu, load_weights)
        return cls(OpenClipEncoder(model, pcfg, False, arch, antialias), scale=scale, name=name)

    def _score(self, images: Tensor, prompts, reference_images: Tensor) -> Tensor:
        a = self.encoder.encode_image(images)
        with torch.no_grad() if not reference_images.requires_grad else torch.enable_grad():
            b = self.encoder.encode_image(reference_images)
        return self.scale * (a * b).sum(-1)


def clip(**options) -> ClipScore:
    return ClipScore.from_options(**options)


def clip_t(**options) -> ClipScore:
    """CLIP-T as in DreamBench(++): ViT-B/32 OpenAI, ``100 * cos``."""
    options.setdefault("scale", 100.0)
    options.setdefault("name", "clip-t")
    return ClipScore.from_options(**options)


def clip_i(**options) -> ClipImageSimilarity:
    """CLIP-I as in DreamBench(++): ViT-B/32 OpenAI, ``100 * cos`` to the reference image."""
    options.setdefault("scale", 100.0)
    return ClipImageSimilarity.from_options(**options)
