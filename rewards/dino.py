"""DINO / DINOv2 image-image similarity (as in DreamBench++ ``metrics/``).

Reproduces the DreamBench++ DINO score: ``Resize(256)`` (shortest side, bicubic) ->
``CenterCrop(224)`` -> ImageNet mean/std -> CLS feature -> cosine (``scale=100`` for the
benchmark's ``100 * cos``). The backbone is a transformers ``Dinov2Model``
(default ``facebook/dinov2-small``); its CLS feature is ``last_hidden_state[:, 0]``
(after the final layernorm, equal to ``pooler_output``).

Assumption: bicubic interpolation for the 256 resize (the DINO evaluation convention,
``interpolation=3``); pass ``interpolation="bilinear"`` for torchvision's default.
Used also as a diversity feature extractor (``features``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import preprocess as P
from .base import Reward, RewardInfo
from .loading import resolve_dir

__all__ = ["DinoSimilarity"]

MODEL_ID = "facebook/dinov2-small"


class DinoSimilarity(Reward):
    def __init__(self, model: nn.Module, scale: float = 1.0, resize_to: int = 256, crop_to: int = 224,
                 interpolation: str = "bicubic", antialias: bool = True, name: str = "dino"):
        super().__init__()
        self.model = model.eval()
        self.scale = float(scale)
        self.resize_to, self.crop_to = resize_to, crop_to
        self.interpolation, self.antialias = interpolation, antialias
        self.info = RewardInfo(
            name=name,
            inputs=("images", "reference_images"),
            source="DINOv2 CLS cosine (DreamBench++ metrics)",
            score_range=(-self.scale, self.scale),
        )

    @classmethod
    def from_options(cls, model: str = MODEL_ID, trust_remote_code: bool = False, **kwargs):
        from transformers import Dinov2Model

        d = resolve_dir(model, "model")
        return cls(Dinov2Model.from_pretrained(str(d), trust_remote_code=trust_remote_code), **kwargs)

    def pixels(self, images: Tensor) -> Tensor:
        x = P.resize_shortest_and_center_crop(images, self.resize_to, self.crop_to, mode=self.interpolation,
                                              antialias=self.antialias, clamp=True, offset="round")
        return P.normalize(x, P.IMAGENET_MEAN, P.IMAGENET_STD)

    def features(self, images: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=self.pixels(images).to(dtype))
        return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)

    def _score(self, images: Tensor, prompts=None, reference_images: Tensor | None = None) -> Tensor:
        return self.scale * (self.features(images) * self.features(reference_images)).sum(-1)


def dino(**options) -> DinoSimilarity:
    return DinoSimilarity.from_options(**options)
