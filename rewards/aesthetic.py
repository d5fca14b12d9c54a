"""LAION aesthetic predictor ("improved aesthetic predictor", Schuhmann et al.).

Reproduces ``christophschuhmann/improved-aesthetic-predictor`` ``simple_inference.py``:

* image embedding of OpenAI CLIP ViT-L/14 (``clip.load("ViT-L/14")``; here open_clip
  ``ViT-L-14`` with the ``openai`` tag, QuickGELU), preprocessed like CLIP
  (bicubic shortest-side resize 224, center crop 224, OpenAI CLIP mean/std);
* the embedding is L2-normalised (``normalized()`` in the reference);
* MLP ``Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64)
  Dropout(0.1) Linear(64,16) Linear(16,1)``: no activations, keys ``layers.{0,2,4,6,7}``;
  the released head is ``sac+logos+ava1-l14-linearMSE.pth`` (a plain state dict).

The score is the predicted mean rating on a 1-10 scale (typically 4-7 for photographs).
No normalisation constants are published. Prompts are not used.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Reward, RewardInfo
from .clip_score import OpenClipEncoder, build_open_clip
from .loading import load_into, load_state_dict, resolve_file, unwrap_state_dict

__all__ = ["AestheticMLP", "AestheticReward"]

HEAD_REPO = "camenduru/improved-aesthetic-predictor"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The released 5-layer linear MLP (dropout layers keep the ``layers.N`` numbering)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(Reward):
    info = RewardInfo(
        name="aesthetic",
        inputs=("images",),
        source="christophschuhmann/improved-aesthetic-predictor (LAION aesthetic v2)",
        score_range=(1.0, 10.0),
    )

    def __init__(self, encoder: OpenClipEncoder, head: AestheticMLP):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @classmethod
    def from_options(cls, head_checkpoint: str = HEAD_REPO, head_filename: str = HEAD_FILE,
                     arch: str | dict = "ViT-L-14", pretrained: str | None = "openai", checkpoint=None,
                     filename=None, quick_gelu=None, load_weights: bool = True, antialias: bool = True):
        head_path = resolve_file(head_checkpoint, head_filename, "head_checkpoint") if load_weights else None
        model, pcfg = build_open_clip(arch, pretrained, checkpoint, filename, quick_gelu, load_weights)
        head = AestheticMLP(model.visual.output_dim)
        if head_path is not None:
            path = head_path
            load_into(head, unwrap_state_dict(load_state_dict(path)), f"aesthetic head {path}")
        head.eval()
        return cls(OpenClipEncoder(model, pcfg, tokenizer=False, arch=arch, antialias=antialias), head)

    def _score(self, images: Tensor, prompts=None, **cond) -> Tensor:
        emb = self.encoder.encode_image(images)  # already L2-normalised, float32
        return self.head(emb.to(self.head.layers[0].weight.dtype)).squeeze(-1)


def aesthetic(**options) -> AestheticReward:
    return AestheticReward.from_options(**options)
