"""PickScore (Kirstain et al. 2023, ``yuvalkirstain/PickScore``).

Reproduces the README inference snippet:

* model: transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (a CLIP ViT-H/14
  fine-tuned on Pick-a-Pic);
* processor: ``AutoProcessor`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` =
  ``CLIPImageProcessor`` with ``shortest_edge=224`` bicubic resize, ``224x224`` center
  crop (offset floored, transformers style), OpenAI CLIP mean/std; text padded/truncated
  to 77 tokens;
* score = ``logit_scale.exp() * cos(image_embeds, text_embeds)`` (about 18-23 for
  typical generations; ``logit_scale.exp()`` is 100 in the released model).

The tensor path resizes with the anti-aliased bicubic kernel; measured against
``CLIPImageProcessorPil`` on photographs in tests. Any CLIPModel directory works
(``model=...``); the tokenizer is loaded from ``processor`` (a local dir or cached hub id) or
passed as an object. ``trust_remote_code`` is never set unless you pass it.
No normalisation constants are published.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import preprocess as P
from .base import Reward, RewardInfo
from .loading import MissingWeightsError, resolve_dir

__all__ = ["PickScoreReward"]

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(out) -> Tensor:
    # transformers 5 returns a model output (pooler/projected in .image_embeds/.text_embeds
    # or .pooler_output depending on the call); older versions return a tensor
    if isinstance(out, Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        v = getattr(out, attr, None)
        if v is not None:
            return v
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


class PickScoreReward(Reward):
    info = RewardInfo(
        name="pickscore",
        inputs=("images", "prompts"),
        source="yuvalkirstain/PickScore_v1 (transformers CLIPModel)",
        score_range=(15.0, 25.0),
    )

    def __init__(self, model: nn.Module, tokenizer, image_size: int = 224, mean=P.CLIP_MEAN, std=P.CLIP_STD,
                 max_length: int = 77, antialias: bool = True):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_length = max_length
        self.antialias = antialias

    @classmethod
    def from_options(cls, model: str = MODEL_ID, processor: str = PROCESSOR_ID, tokenizer=None,
                     trust_remote_code: bool = False, antialias: bool = True, **_ignored):
        from transformers import AutoTokenizer, CLIPModel

        model_dir = resolve_dir(model, "model")
        clip = CLIPModel.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        if tokenizer is None:
            try:
                tok_dir = resolve_dir(processor, "processor", required="tokenizer_config.json")
            except MissingWeightsError:
                tok_dir = model_dir  # some copies of PickScore ship the tokenizer too
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
            except Exception as err:
                raise MissingWeightsError(
                    f"no tokenizer in {tok_dir} ({type(err).__name__}); pass processor=<dir with the CLIP "
                    f"tokenizer files> (default {PROCESSOR_ID})"
                ) from None
        return cls(clip, tokenizer, antialias=antialias)

    def pixels(self, images: Tensor) -> Tensor:
        x = P.resize_shortest_and_center_crop(images, self.image_size, mode="bicubic", antialias=self.antialias, clamp=True,
                                              offset="floor")
        return P.normalize(x, self.mean, self.std)

    def _score(self, images: Tensor, prompts: list[str], **cond) -> Tensor:
        dev = self.device
        dtype = next(self.model.parameters()).dtype
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        img = _features(self.model.get_image_features(pixel_values=self.pixels(images).to(dtype)))
        txt = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(dev),
                                                     attention_mask=tok["attention_mask"].to(dev)))
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


def pickscore(**options) -> PickScoreReward:
    return PickScoreReward.from_options(**options)
