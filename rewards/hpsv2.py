"""HPSv2 / HPSv2.1 (Human Preference Score v2, Wu et al. 2023; ``tgxs002/HPSv2``).

Reproduces ``hpsv2/img_score.py`` with ``light_augmentation=True``:

* model: open_clip ``ViT-H-14`` built with **no** pretrained weights (the reference first
  builds it with the LAION weights and then overwrites them; we never download those), the
  HPS checkpoint ``{'state_dict': ...}`` (``HPS_v2_compressed.pt`` /
  ``HPS_v2.1_compressed.pt`` in hub repo ``xswu/HPSv2``) loaded strictly over it;
* preprocessing (``hpsv2/src/open_clip/transform.py``, eval branch): ``ToTensor`` then
  ``ResizeMaxSize(224)`` -- longest side to 224 with bicubic, applied only when the scale
  is not 1, then zero pad ``[pw//2, ph//2, pw-pw//2, ph-ph//2]`` -- then OpenAI CLIP
  mean/std;
* score: raw cosine of the normalised image/text features (``image_features @
  text_features.T`` diagonal), no logit scale; about 0.2-0.35 for trained generators.

Assumption: the reference resizes a *tensor* with torchvision ``F.resize``. torchvision >=
0.17 anti-aliases tensors by default (this module's default, ``antialias=True``); the
torchvision of 2023 did not (``antialias=False`` reproduces that). The reference scores
under CUDA fp16 autocast; we compute in the model's dtype (fp32 by default).
No normalisation constants are published.
"""

from __future__ import annotations

from .clip_score import ClipScore, OpenClipEncoder, build_open_clip
from .base import RewardInfo

__all__ = ["HPSv2Reward", "hpsv2", "hpsv2_1"]

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2Reward(ClipScore):
    @classmethod
    def from_options(cls, version: str = "v2.1", checkpoint: str = HPS_REPO, filename: str | None = None,
                     arch: str | dict = "ViT-H-14", tokenizer=None, load_weights: bool = True,
                     antialias: bool = True, name: str | None = None):
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {list(HPS_FILES)}, got {version!r}")
        filename = filename or HPS_FILES[version]
        model, pcfg = build_open_clip(arch, None, checkpoint, filename, quick_gelu=False, load_weights=load_weights)
        pcfg.update(resize_mode="longest", interpolation="bicubic", clamp=False)  # tensor reference: no clip
        encoder = OpenClipEncoder(model, pcfg, tokenizer, arch, antialias)
        reward = cls(encoder, scale=1.0)
        reward.info = RewardInfo(
            name=name or ("hpsv2.1" if version == "v2.1" else "hpsv2"),
            inputs=("images", "prompts"),
            source=f"tgxs002/HPSv2 ({filename}), open_clip ViT-H-14",
            score_range=(0.0, 0.4),
        )
        return reward


def hpsv2(**options) -> HPSv2Reward:
    options.setdefault("version", "v2.0")
    return HPSv2Reward.from_options(**options)


def hpsv2_1(**options) -> HPSv2Reward:
    options.setdefault("version", "v2.1")
    return HPSv2Reward.from_options(**options)
