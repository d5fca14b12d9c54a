"""EditReward (TIGER-AI-Lab/EditReward): a reward for instruction-guided image edits.

Reproduces the released multi-head model (``Qwen2_5_VLRewardModelBT_MultiHead`` in
``EditReward/model/qwen2_5_vl_trainer.py`` with ``rm_head_type="ranknet_multi_head"``,
``reward_token="special"``, ``output_dim=2``, ``pooling_strategy="mean"``; configs
``EditReward-Qwen2.5-7B-VL.yaml`` and ``EditReward-MiMo-VL-7B-SFT-2508.yaml``):

* backbone: transformers Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct`` or
  ``XiaomiMiMo/MiMo-VL-7B-SFT-2508``), built here from its config -- the base weights are
  never fetched, the fine-tuned checkpoint replaces all of them;
* ``<|Reward|>`` added to the tokenizer as a special token (id ``len(tokenizer)``); the
  embedding table is resized to ``len(tokenizer)`` (the checkpoint's row count is used);
* heads ``rm_heads.head_0`` / ``head_1``: Linear(hidden,1024)-ReLU-Dropout(0.05)-
  Linear(1024,16)-ReLU-Linear(16,2) in fp32, read at the ``<|Reward|>`` position;
* one VLM forward per head: head 0 gets ``INSTRUCTION_EDIT_FOLLOWING`` ("dim1"), head 1
  ``INSTRUCTION_EDIT_QUALITY`` ("dim2") from ``EditReward/dataset/prompts.py``, formatted
  with the instruction and followed by ``prompt_with_special_token``
  (``"\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"``);
* message: one user turn ``[source image, edited image, text]`` rendered by the
  processor's chat template with ``add_generation_prompt=True``; tokenizer padding on the
  right; each ``<|image_pad|>`` expanded to ``t*h*w / merge**2`` tokens;
* images: ``min_pixels = max_pixels = 256*28*28`` (Qwen2.5-VL ``smart_resize``, factor 28),
  OpenAI CLIP mean/std, patch 14, temporal patch 2 (the frame repeated), merge 2;
* output per head ``[B,2] = (mu, log_sigma)``; the model output is the mean over heads
  (``pooling_strategy="mean"``), and the score is its ``[..., 0]`` = mean of the heads' mu.
  It is unbounded (can be negative); no normalisation constants are published.
* positions: the reference calls the language model with ``input_ids=None`` and no
  ``image_grid_thw`` (``_run_single_batch_through_model_and_head``), so with transformers
  4.57 (the pinned version) ``get_rope_index`` falls back to plain 1D positions
  ``cumsum(attention_mask) - 1`` repeated on the three M-RoPE axes -- not Qwen2.5-VL's 3D
  image positions. The model was trained and evaluated that way; we pass the same
  position ids explicitly so the result does not depend on the transformers version.

Checkpoint: the reference saves ``model.state_dict()`` with ``torch.save`` to
``model.pth`` (or ``model.safetensors``) and loads it with ``strict=True``. Keys in the
transformers >= 4.52 layout: ``model.visual.*``, ``model.language_model.*``,
``lm_head.weight``, ``rm_heads.head_{0,1}.{0,3,5}.{weight,bias}``; the pre-4.52 layout
(``visual.*``, ``model.layers.*``) is mapped onto it. Loaded through
:mod:`rewards.loading` (tensors only, no pickled code), strictly.

Differentiable path: images are resized with the anti-aliased bicubic kernel (PIL's
``BICUBIC``, which the reference's ``fetch_image`` uses, clamped like PIL's 8-bit output),
normalised and patchified in torch, in exactly ``Qwen2VLImageProcessor``'s layout.

ASSUMPTIONS (not confirmed from source): the hub locations of the fine-tuned checkpoints
(``checkpoint=`` is therefore required); the MiMo variant uses the base directory's own
chat template (as ``processor.apply_chat_template`` does in the reference).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import preprocess as P
from .base import Reward, RewardInfo
from .loading import MissingWeightsError, load_into, load_state_dict, resolve_dir, resolve_file, unwrap_state_dict

__all__ = [
    "EditRewardModel",
    "EditRewardReward",
    "INSTRUCTION_EDIT_FOLLOWING",
    "INSTRUCTION_EDIT_QUALITY",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "REWARD_TOKEN",
    "build_messages",
    "patchify",
    "pixel_inputs",
    "smart_resize",
]

QWEN_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
MIMO_ID = "XiaomiMiMo/MiMo-VL-7B-SFT-2508"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels = 200704
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2
CKPT_FILES = ("model.pth", "model.safetensors")  # the order the reference tries them

# EditReward/dataset/prompts.py (verbatim, including the trailing double spaces)
INSTRUCTION_EDIT_FOLLOWING = """
You are tasked with evaluating an edited image **in comparison with the original source image** based on **Instruction Following & Semantic Fidelity**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  
This dimension focuses on how accurately, completely, and exclusively the model executed the given text instruction.

**Inputs Provided:**  
- Source Image (before editing)  
- Edited Image (after applying the instruction)  
- Text Instruction  

**Sub-Dimensions to Evaluate:**

- **Semantic Accuracy:**  
  Assess whether the edited content accurately captures the semantics of the instruction. The edited result should precisely match the intended meaning. For example, if the instruction is "replace apples with oranges," the object must clearly be oranges, not other fruits.

- **Completeness of Editing:**  
  Check whether **all parts** of the instruction are fully executed. For multi-step edits (e.g., "replace a red car with a blue bicycle"), both the color change and the object replacement must be done without omissions.

- **Exclusivity of Edit (No Over-Editing):**  
  Ensure that only the requested parts are changed. The rest of the image (as seen in the source) should remain unaltered. For example, if the instruction only involves replacing an object, the background, lighting, and unrelated objects should not be unnecessarily modified.

**Scoring Criteria:**
- **4 (Very Good):** Perfectly accurate, complete, and exclusive execution of the instruction.  
- **3 (Relatively Good):** Largely correct, but with minor omissions or slight over-editing.  
- **2 (Relatively Poor):** Major misinterpretation, incomplete edits, or noticeable unintended changes.  
- **1 (Very Poor):** Instruction ignored or completely wrong execution.

Text instruction - {text_prompt}
"""

INSTRUCTION_EDIT_QUALITY = """
You are tasked with evaluating an edited image **in comparison with the original source image** based on **Visual Quality & Realism**, and assigning a score from 1 to 4, with 1 being the worst and 4 being the best.  
This dimension focuses on how realistic, artifact-free, and aesthetically appealing the edited image is, while remaining consistent with the source image.

**Inputs Provided:**  
- Source Image (before editing)  
- Edited Image (after applying the instruction)  
- Text Instruction  

**Sub-Dimensions to Evaluate:**

- **Plausibility & Physical Consistency:**  
  Check whether the edit aligns with the laws of physics and the scene context. Lighting, shadows, reflections, perspective, size, and interactions with the environment should all appear natural compared to the source image.

- **Artifact-Free Quality:**  
  Look for technical flaws such as blur, distortions, pixel misalignment, unnatural textures, or seams around edited regions. High-quality results should be free from such visible artifacts.

- **Aesthetic Quality:**  
  Evaluate the overall harmony and visual appeal. The image should look natural, balanced, and pleasant. Colors, composition, and atmosphere should enhance the image rather than degrade it.

**Scoring Criteria:**
- **4 (Very Good):** Perfectly realistic, artifact-free, seamless, and aesthetically pleasing.  
- **3 (Relatively Good):** Mostly realistic and clean, with only minor flaws that do not significantly distract.  
- **2 (Relatively Poor):** Noticeable physical inconsistencies or visible artifacts that make the edit unnatural.  
- **1 (Very Poor):** Severe artifacts, incoherent composition, or visually unusable result.

Text instruction - {text_prompt}
"""

# EditReward/dataset/data_collator_qwen_edit.py: prompt_with_special_token
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
#: head i <- prompt i ("dim1", "dim2" in the reference's collator / inferencer)
HEAD_PROMPTS = (INSTRUCTION_EDIT_FOLLOWING, INSTRUCTION_EDIT_QUALITY)

#: Qwen2.5-VL's processor chat template (``chat_template.json``); used when neither the
#: base-model directory nor the tokenizer supplies one.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- images -----------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = PATCH * MERGE, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: dims multiples of ``factor``, pixel count in range, aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(x: Tensor, patch: int = PATCH, temporal: int = TEMPORAL_PATCH, merge: int = MERGE) -> tuple[Tensor, Tensor]:
    """``[B,C,H,W]`` (normalised) -> flat patches ``[B*gh*gw, C*temporal*patch*patch]`` and ``grid [B,3]``.

    Rows run over merge windows (``gh/merge``, ``gw/merge``) then inside each window
    (``merge``, ``merge``); columns over channel, time (the frame repeated), patch row,
    patch column -- ``Qwen2VLImageProcessor``'s layout.
    """
    b, c, h, w = x.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image size {h}x{w} is not a multiple of {patch * merge}")
    gh, gw = h // patch, w // patch
    p = x.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    p = p.permute(0, 2, 5, 3, 6, 1, 4, 7)  # b, gh/m, gw/m, m, m, c, patch, patch
    p = p.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    flat = p.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
    return flat, grid


def pixel_inputs(images: Tensor, min_pixels: int = PIXELS, max_pixels: int = PIXELS, patch: int = PATCH,
                 temporal: int = TEMPORAL_PATCH, merge: int = MERGE, antialias: bool = True, clamp: bool = True
                 ) -> tuple[Tensor, Tensor]:
    """``[B,3,H,W]`` in [0,1] -> (``pixel_values [B*gh*gw, 3*temporal*patch**2]``, ``image_grid_thw [B,3]``).

    smart_resize (factor ``patch*merge``) with the anti-aliased bicubic kernel (``clamp``
    clips the overshoot like PIL's 8-bit output), OpenAI CLIP mean/std, :func:`patchify`.
    Differentiable with respect to ``images``.
    """
    size = smart_resize(images.shape[-2], images.shape[-1], patch * merge, min_pixels, max_pixels)
    x = P.resize(images, size, mode="bicubic", antialias=antialias, clamp=clamp)
    x = P.normalize(x, P.CLIP_MEAN, P.CLIP_STD)
    return patchify(x, patch, temporal, merge)


# --- text -------------------------------------------------------------------------------
def build_messages(instruction: str, template: str) -> list[dict]:
    """The reference's single user turn: source image, edited image, prompt + reward suffix."""
    text = template.format(text_prompt=instruction) + REWARD_SUFFIX
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]


def _expand_image_pads(text: str, counts: Sequence[int]) -> str:
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"chat text has {len(parts) - 1} {IMAGE_PAD} placeholders for {len(counts)} images")
    out = [parts[0]]
    for n, rest in zip(counts, parts[1:]):
        out.append(IMAGE_PAD * int(n) + rest)
    return "".join(out)


def _remap_legacy_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers < 4.52 layout (``visual.*``, ``model.layers.*``) -> ``model.visual.*``, ``model.language_model.*``."""
    if not any(k.startswith("visual.") or k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in sd):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


class _RewardHead(nn.Sequential):
    def __init__(self, hidden: int, width: int = 1024, out_dim: int = 2, dropout: float = 0.05):
        super().__init__(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, 16), nn.ReLU(),
                         nn.Linear(16, out_dim))


class EditRewardModel(nn.Module):
    """Qwen2.5-VL backbone + fp32 reward heads, parameter names as in the released checkpoint.

    ``model`` is transformers' ``Qwen2_5_VLModel`` (``model.visual``, ``model.language_model``),
    ``lm_head`` is kept (unused for scoring) so the released state dict loads strictly.
    """

    def __init__(self, config, num_heads: int = 2, vocab_size: int | None = None, dtype: torch.dtype | None = None,
                 init_weights: bool = True):
        super().__init__()
        from transformers import Qwen2_5_VLModel

        config = config.__class__.from_dict(config.to_dict()) if hasattr(config, "to_dict") else config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config.text_config
        if vocab_size is not None:
            text.vocab_size = int(vocab_size)
        ctx = contextlib.ExitStack()
        if dtype is not None:
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            ctx.callback(torch.set_default_dtype, prev)
        if not init_weights:
            try:
                from transformers.initialization import no_init_weights
            except ImportError:  # transformers < 5
                from transformers.modeling_utils import no_init_weights

            ctx.enter_context(no_init_weights())
        with ctx:
            self.model = Qwen2_5_VLModel(config)
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.get_input_embeddings().weight
        self.config = config
        self.rm_heads = nn.ModuleDict({f"head_{i}": _RewardHead(text.hidden_size) for i in range(num_heads)}).float()
        self.eval()

    @property
    def num_heads(self) -> int:
        return len(self.rm_heads)

    def hidden_at(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, image_grid_thw: Tensor,
                  reward_token_id: int) -> Tensor:
        """Last hidden state at the ``<|Reward|>`` token: ``[B, hidden]``."""
        hits = input_ids == reward_token_id
        counts = hits.sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(f"expected exactly one {REWARD_TOKEN} token per sequence, got counts {counts.tolist()}")
        # 1D positions on all three M-RoPE axes, as the reference gets from get_rope_index(None, ...)
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        pos = pos[None].expand(3, -1, -1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                         pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[hits]  # one row per sequence, batch order

    def head(self, i: int, hidden: Tensor) -> Tensor:
        """Head ``i`` in fp32 on the reward-token hidden state: ``[B, 2] = (mu, log_sigma)``."""
        return self.rm_heads[f"head_{i}"](hidden.float())

    def load_released(self, state_dict: Mapping[str, Tensor], what: str = "EditReward checkpoint") -> None:
        sd = _remap_legacy_keys(unwrap_state_dict(dict(state_dict)))
        if getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd.get("model.language_model.embed_tokens.weight")
        load_into(self, sd, what)
        self.rm_heads.float()


# --- reward -----------------------------------------------------------------------------
class EditRewardReward(Reward):
    """``score(edited, instructions, source_images=source) -> Tensor[B]`` (mean of the heads' mu)."""

    def __init__(self, model: EditRewardModel, tokenizer, chat_template: str | None = None,
                 pixels: int = PIXELS, antialias: bool = True, clamp: bool = True, name: str = "editreward",
                 source: str = ""):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN2_5_VL_CHAT_TEMPLATE
        self.min_pixels = self.max_pixels = int(pixels)
        self.antialias, self.clamp = antialias, clamp
        vcfg = model.config.vision_config
        self.patch, self.temporal, self.merge = vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size
        ids = tokenizer.convert_tokens_to_ids([REWARD_TOKEN, IMAGE_PAD])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(f"tokenizer lacks {REWARD_TOKEN} or {IMAGE_PAD}: add {REWARD_TOKEN} as a special token")
        self.reward_token_id, image_pad_id = ids
        if image_pad_id != model.config.image_token_id:
            raise ValueError(f"tokenizer's {IMAGE_PAD} id {image_pad_id} != config.image_token_id {model.config.image_token_id}")
        rows = model.model.get_input_embeddings().weight.shape[0]
        if self.reward_token_id >= rows:
            raise ValueError(f"{REWARD_TOKEN} id {self.reward_token_id} is outside the embedding table ({rows} rows)")
        self.info = RewardInfo(
            name=name,
            inputs=("images", "prompts", "source_images"),
            source=source or "TIGER-AI-Lab/EditReward (Qwen2.5-VL + 2 reward heads at <|Reward|>)",
            score_range=None,  # unbounded, can be negative
            extra={"heads": ("instruction_following", "visual_quality"), "output": "mean over heads of mu"},
        )

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_options(cls, base_model: str = QWEN_ID, checkpoint: str | None = None, filename: str | None = None,
                     tokenizer=None, config=None, chat_template: str | None = None, dtype: torch.dtype | None = torch.bfloat16,
                     trust_remote_code: bool = False, name: str = "editreward", **kwargs) -> EditRewardReward:
        from transformers import Qwen2_5_VLConfig

        if checkpoint is None:
            raise MissingWeightsError(
                f"{name} needs checkpoint=/path/to/model.pth or model.safetensors (the fine-tuned EditReward "
                f"state dict: model.visual.*, model.language_model.*, lm_head.*, rm_heads.head_0/1.*); "
                f"base_model={base_model!r} only supplies config and tokenizer"
            )
        base_dir = None
        if config is None or tokenizer is None:
            base_dir = resolve_dir(base_model, "base_model",
                                   allow_patterns=("*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"))
        if config is None:
            config = Qwen2_5_VLConfig.from_pretrained(str(base_dir))
        elif isinstance(config, dict):
            config = Qwen2_5_VLConfig(**config)
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
            except Exception as err:
                raise MissingWeightsError(
                    f"no tokenizer in {base_dir} ({type(err).__name__}); pass base_model=<dir with the "
                    f"Qwen2.5-VL tokenizer files> or tokenizer=<object>"
                ) from None
        add_reward_token(tokenizer)
        if chat_template is None and base_dir is not None:
            chat_template = _read_chat_template(base_dir)
        path = _resolve_checkpoint(checkpoint, filename)
        sd = _remap_legacy_keys(unwrap_state_dict(load_state_dict(path)))
        emb = sd.get("model.language_model.embed_tokens.weight")
        if emb is None:
            raise ValueError(f"{name} checkpoint {path}: no model.language_model.embed_tokens.weight "
                             f"(is this an EditReward state dict?)")
        heads = len({k.split(".")[1] for k in sd if k.startswith("rm_heads.")}) or 2
        model = EditRewardModel(config, num_heads=heads, vocab_size=emb.shape[0], dtype=dtype, init_weights=False)
        model.load_released(sd, f"{name} checkpoint {path}")
        if dtype is not None:  # as the reference: model.to(bf16) (buffers included), heads back to fp32
            model.to(dtype)
            model.rm_heads.float()
        return cls(model, tokenizer, chat_template, name=name, source=f"{name}: {base_model} + {path}", **kwargs)

    # -- preprocessing ------------------------------------------------------------------------
    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)

    def pixels(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[B,3,H,W]`` in [0,1] -> (``pixel_values [B*gh*gw, 3*2*14*14]``, ``image_grid_thw [B,3]``)."""
        return pixel_inputs(images, self.min_pixels, self.max_pixels, self.patch, self.temporal, self.merge,
                            self.antialias, self.clamp)

    def texts(self, instructions: Sequence[str], head: int, grids: Sequence[Sequence[int]]) -> list[str]:
        """Chat-rendered text for ``head`` with ``<|image_pad|>`` expanded per image (2 per sample)."""
        out = []
        for i, instr in enumerate(instructions):
            if REWARD_TOKEN in instr:
                raise ValueError(f"instruction {i} contains the reserved token {REWARD_TOKEN}")
            text = self.tokenizer.apply_chat_template(build_messages(instr, HEAD_PROMPTS[head]),
                                                      chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            counts = [int(math.prod(grids[2 * i + j])) // self.merge**2 for j in range(2)]
            out.append(_expand_image_pads(text, counts))
        return out

    def inputs(self, images: Tensor, prompts: Sequence[str], source_images: Tensor, head: int) -> dict[str, Tensor]:
        """The processor-equivalent batch for one head (images interleaved source, edited)."""
        dev = self.device
        b = images.shape[0]
        pv_src, g_src = self.pixels(source_images)
        pv_edit, g_edit = self.pixels(images)
        n_src, n_edit = pv_src.shape[0] // b, pv_edit.shape[0] // b
        pv = torch.cat([pv_src.view(b, n_src, -1), pv_edit.view(b, n_edit, -1)], dim=1).reshape(-1, pv_src.shape[-1])
        grid = torch.stack([g_src, g_edit], dim=1).reshape(-1, 3)
        tok = self.tokenizer(self.texts(prompts, head, grid.tolist()), padding=True, return_tensors="pt",
                             padding_side="right", add_special_tokens=False)
        return {"input_ids": tok["input_ids"].to(dev), "attention_mask": tok["attention_mask"].to(dev),
                "pixel_values": pv.to(dev), "image_grid_thw": grid.to(dev)}

    # -- scoring --------------------------------------------------------------------------------
    def head_outputs(self, images: Tensor, prompts: Sequence[str], source_images: Tensor) -> Tensor:
        """``[B, heads, 2]`` = per-head (mu, log_sigma); one VLM forward per head."""
        vis_dtype = next(self.model.model.visual.parameters()).dtype
        outs = []
        for h in range(self.model.num_heads):
            batch = self.inputs(images, prompts, source_images, h)
            batch["pixel_values"] = batch["pixel_values"].to(vis_dtype)
            hidden = self.model.hidden_at(reward_token_id=self.reward_token_id, **batch)
            outs.append(self.model.head(h, hidden))
        return torch.stack(outs, dim=1)

    def score_with_uncertainty(self, images: Tensor, prompts: str | Sequence[str], source_images: Tensor
                               ) -> tuple[Tensor, Tensor]:
        """``(mu [B], log_sigma [B, heads])``: mu = mean over heads (the score), per-head log-sigma."""
        images, texts, cond = self.validate(images, prompts, source_images=source_images)
        out = self.head_outputs(images, texts, cond["source_images"])
        return out[..., 0].mean(-1), out[..., 1]

    def _score(self, images: Tensor, prompts: list[str], source_images: Tensor | None = None, **cond) -> Tensor:
        return self.head_outputs(images, prompts, source_images)[..., 0].mean(-1)


# --- helpers ------------------------------------------------------------------------------
def add_reward_token(tokenizer) -> int:
    """Add ``<|Reward|>`` as a special token (as the reference does) and return its id."""
    from tokenizers import AddedToken

    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(REWARD_TOKEN)


def _read_chat_template(base_dir) -> str | None:
    f = base_dir / "chat_template.json"
    if f.is_file():
        return json.loads(f.read_text()).get("chat_template")
    f = base_dir / "chat_template.jinja"
    return f.read_text() if f.is_file() else None


def _resolve_checkpoint(checkpoint: str, filename: str | None):
    if filename is not None:
        return resolve_file(checkpoint, filename, "checkpoint")
    last = None
    for fn in CKPT_FILES:
        try:
            return resolve_file(checkpoint, fn, "checkpoint")
        except MissingWeightsError as err:
            last = err
    raise MissingWeightsError(f"neither {' nor '.join(CKPT_FILES)} found for checkpoint={checkpoint!r} ({last})")


def editreward(base_model: str = QWEN_ID, **options) -> EditRewardReward:
    return EditRewardReward.from_options(base_model=base_model, **options)


def editreward_mimo(base_model: str = MIMO_ID, **options) -> EditRewardReward:
    return EditRewardReward.from_options(base_model=base_model, name="editreward-mimo", **options)

