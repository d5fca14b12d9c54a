"""LPIPS perceptual distance / similarity (Zhang et al. 2018, ``lpips`` 0.1.4).

Reproduces ``lpips.LPIPS(net=..., version="0.1")``: the package's scaling layer, backbone
(AlexNet / VGG16 / SqueezeNet 1.1 features) and the linear heads shipped inside the
package (``lpips/weights/v0.1/{alex,vgg,squeeze}.pth``, loaded offline by ``lpips``).

* Inputs: our contract is ``[0,1]``; LPIPS wants ``[-1,1]``. We convert explicitly
  (``2x - 1``) and call the network with ``normalize=False``, so the conversion happens
  exactly once.
* Backbone weights: ``lpips`` would ask torchvision to download them. We build it with
  ``pnet_rand=True`` (random backbone, no download) and load a torchvision state dict
  (``features.N.*`` keys, e.g. ``alexnet-owt-7be5be79.pth``) from ``backbone_weights`` --
  a path, or ``"auto"`` for the torch hub cache (``$TORCH_HOME/hub/checkpoints``) -- and
  map ``features.N.*`` onto lpips' ``net.sliceK.N.*``. ``backbone_weights=None`` keeps the
  random backbone (tests only: the scores are then meaningless).
* ``lpips`` = distance (lower is better, ~0-1); ``lpips-sim`` = ``1 - distance``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .base import Reward, RewardInfo
from .loading import MissingWeightsError, load_state_dict, unwrap_state_dict

__all__ = ["LPIPSReward", "map_torchvision_backbone"]

TORCHVISION_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def map_torchvision_backbone(net, torchvision_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``features.N.rest`` keys -> lpips ``sliceK.N.rest`` keys of ``net``."""
    out = {}
    missing = []
    for key in net.state_dict():
        _, rest = key.split(".", 1)  # sliceK.N.rest -> N.rest
        src = f"features.{rest}"
        if src in torchvision_sd:
            out[key] = torchvision_sd[src]
        else:
            missing.append(src)
    if missing:
        raise ValueError(f"backbone checkpoint lacks {len(missing)} torchvision key(s), e.g. {missing[:4]}")
    return out


class LPIPSReward(Reward):
    def __init__(self, net: str = "alex", backbone_weights: str | None = "auto", similarity: bool = False,
                 name: str | None = None):
        super().__init__()
        import lpips

        if net not in TORCHVISION_FILES:
            raise ValueError(f"net must be one of {list(TORCHVISION_FILES)}, got {net!r}")
        self.lpips = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.random_backbone = backbone_weights is None
        if backbone_weights is not None:
            path = self._resolve(net, backbone_weights)
            sd = unwrap_state_dict(load_state_dict(path))
            self.lpips.net.load_state_dict(map_torchvision_backbone(self.lpips.net, sd), strict=True)
        self.lpips.eval()
        for p in self.lpips.parameters():
            p.requires_grad_(False)
        self.similarity = similarity
        self.info = RewardInfo(
            name=name or ("lpips-sim" if similarity else "lpips"),
            inputs=("images", "reference_images"),
            source=f"lpips 0.1.4 LPIPS(net={net!r}, version='0.1')",
            score_range=(0.0, 1.0),
            higher_is_better=similarity,
        )

    @staticmethod
    def _resolve(net: str, backbone_weights: str) -> Path:
        filename = TORCHVISION_FILES[net]
        if backbone_weights == "auto":
            path = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not path.is_file():
                raise MissingWeightsError(
                    f"LPIPS {net} backbone {filename} not found in {path.parent}: pass "
                    f"backbone_weights=/path/to/{filename} (torchvision ImageNet weights)"
                )
            return path
        path = Path(os.path.expanduser(backbone_weights))
        if path.is_dir():
            path = path / filename
        if not path.is_file():
            raise MissingWeightsError(f"LPIPS backbone weights {path} not found; pass backbone_weights=/path/to/{filename}")
        return path

    def distance(self, images: Tensor, reference_images: Tensor) -> Tensor:
        return self.lpips(images * 2 - 1, reference_images * 2 - 1, normalize=False).flatten()

    def _score(self, images: Tensor, prompts=None, reference_images: Tensor | None = None) -> Tensor:
        d = self.distance(images, reference_images)
        return 1.0 - d if self.similarity else d


def lpips_distance(net: str = "alex", backbone_weights: str | None = "auto", name: str | None = None) -> LPIPSReward:
    return LPIPSReward(net, backbone_weights, similarity=False, name=name)


def lpips_similarity(net: str = "alex", backbone_weights: str | None = "auto", name: str | None = None) -> LPIPSReward:
    return LPIPSReward(net, backbone_weights, similarity=True, name=name)
