"""Reward models with one contract: images ``[B,3,H,W]`` in ``[0,1]`` -> ``Tensor[B]``.

>>> import rewards
>>> r = rewards.load("hpsv2.1", checkpoint="/models/HPS_v2.1_compressed.pt")
>>> r(images, ["a cat"] * len(images))              # differentiable w.r.t. images
>>> both = rewards.load({"hpsv2.1": 1.0, "clip": 0.5})  # CompositeReward
>>> both.score_components(images, prompts)           # {"hpsv2.1": ..., "clip": ..., "total": ...}

``rewards.register(name, factory)`` adds a reward; ``rewards.available()`` lists them.
``rewards.load("remote:http://host:port")`` is a reward served by another process
(``imgalign serve-reward``; the client and protocol in ``rewards.remote``, the server in
``rewards.server``).
Installed packages add theirs through the ``imgalign.rewards`` entry-point group (the Shapes
rewards do), so ``rewards.load("shapes-verifier")`` needs no other import first.
Preference losses are in ``rewards.preference``, metrics in ``rewards.evaluation``, dataset
reading in ``rewards.data`` (images decoded by ``rewards.load_image``, every PIL mode) and
reward-model training in ``rewards.training``.
This package never imports ``imgalign`` or ``pipelines``.
"""

from . import data, evaluation, images, preference
from .base import Reward, RewardInfo, validate_images
from .composite import CompositeReward
from .images import UnreadableImageError, load_image
from .loading import MissingWeightsError, UnsafeCheckpointError, load_state_dict
from .registry import available, load, parse_spec, register

__all__ = [
    "CompositeReward",
    "MissingWeightsError",
    "Reward",
    "RewardInfo",
    "UnreadableImageError",
    "UnsafeCheckpointError",
    "available",
    "load",
    "load_image",
    "load_state_dict",
    "parse_spec",
    "register",
    "validate_images",
]

# Built-in rewards, imported lazily on first load (name -> "module:factory").
for _name, _target in {
    "clip": "rewards.clip_score:clip",
    "clip-t": "rewards.clip_score:clip_t",
    "clip-i": "rewards.clip_score:clip_i",
    "aesthetic": "rewards.aesthetic:aesthetic",
    "jpeg-compressibility": "rewards.compressibility:jpeg_compressibility",
    "jpeg-incompressibility": "rewards.compressibility:jpeg_incompressibility",
    "hpsv2": "rewards.hpsv2:hpsv2",
    "hpsv2.1": "rewards.hpsv2:hpsv2_1",
    "pickscore": "rewards.pickscore:pickscore",
    "imagereward": "rewards.imagereward:imagereward",
    "vp-score": "rewards.imagereward:vp_score",
    "lpips": "rewards.lpips_reward:lpips_distance",
    "lpips-sim": "rewards.lpips_reward:lpips_similarity",
    "dino": "rewards.dino:dino",
    "editreward": "rewards.editreward:editreward",
    "editreward-mimo": "rewards.editreward:editreward_mimo",
    "trained-reward": "rewards.training:load_trained_reward",
}.items():
    register(_name, _target)
del _name, _target
