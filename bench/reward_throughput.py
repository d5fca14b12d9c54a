"""Figure: batched reward scoring throughput vs the per-image loop of the reference packages.

The reference scorers (ImageReward's ``ImageReward.score``, HPSv2's ``img_score.score``)
take one image per call: preprocess it, forward, repeat. Baseline here: a Python loop of
``reward.score(image[None], [prompt])`` under ``no_grad``; ours:
``reward.score_batched(images, prompts, batch_size=B)``. Same reward object, same images,
same prompts, same autocast dtype, runs interleaved. Images/s of both, the speedup, peak GPU
memory, and the max |score difference| between the two paths.
Goal: speedup >= 10x at batch 32 on a GPU.

Models are built with random weights (nothing is downloaded or read from disk):

* ``hpsv2``       open_clip ViT-H-14 (HPSv2.1 preprocessing: longest side + pad), needs open_clip;
* ``pickscore``   transformers CLIPModel ViT-H/14 (laion/CLIP-ViT-H-14 config);
* ``imagereward`` BLIP ViT-L/16 + BERT with cross-attention + MLP (own modules);
* ``clip``        open_clip ViT-L-14 (QuickGELU, OpenAI layout), needs open_clip.

``--size full`` builds the published sizes (default on CUDA, fp16 autocast);
``--size tiny`` the tiny configs of ``tests/test_rewards_*.py`` (default on CPU, fp32).
Text goes through small offline tokenizers (character-level CLIP BPE, a few-word BERT
vocab); prompts are padded to the model's fixed length (77 / 35 tokens), so the text
encoders do the same work as with the real vocabularies. A reward whose dependency is not
installed is skipped with a note.

    python bench/reward_throughput.py                       # CPU: tiny, N=32 at 256x256
    python bench/reward_throughput.py --size full           # GPU: published sizes, N=64 at 512x512
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import string

import torch

from common import interleaved, machine_info, print_table, write_json  # noqa: I001

PROMPTS = ["a photo of a cat", "a red cube", "a dog", "a photo of a red dog", "a cat of a dog", "a cube"]
WORDS = ["a", "cat", "dog", "red", "cube", "photo", "of"]

# Tiny configs, as in tests/test_rewards_clip_family.py (TINY) and tests/test_rewards_transformers.py
# (tiny_clip_model, TINY_IR).
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_HF_CLIP = dict(
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=77),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=224, patch_size=32),
    projection_dim=16,
)
TINY_IR = dict(image_size=32, patch_size=16, vision_width=24, vision_layers=1, vision_heads=2, hidden_size=16,
               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=14,
               max_position_embeddings=40, embed_dim=8)

# Published sizes. PickScore_v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json.
FULL_HF_CLIP = dict(
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)

# reward -> (python module it needs, description at full size)
REWARDS = {
    "hpsv2": ("open_clip", "open_clip ViT-H-14"),
    "pickscore": ("transformers", "transformers CLIP ViT-H/14"),
    "imagereward": ("transformers", "BLIP ViT-L/16 + BERT"),
    "clip": ("open_clip", "open_clip ViT-L-14"),
}


def clip_char_tokenizer():
    """CLIPTokenizer over single letters (no merges): offline, same 77-token padding."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase)
    vocab = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)  # 52
    vocab["<|endoftext|>"] = len(vocab)  # 53
    return CLIPTokenizer(vocab=vocab, merges=[])


def blip_bert_tokenizer():
    """bert-base-uncased-like tokenizer with BLIP's [DEC] bos and [ENC] special tokens (14 ids)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def build_reward(name: str, size: str, device: str):
    """The reward with random weights, on ``device`` (parameters created there directly)."""
    full = size == "full"
    torch.manual_seed(0)
    with torch.device(device):
        if name == "hpsv2":
            from rewards.hpsv2 import HPSv2Reward

            reward = HPSv2Reward.from_options(version="v2.1", arch="ViT-H-14" if full else TINY_OPEN_CLIP,
                                              load_weights=False)
        elif name == "clip":
            from rewards.clip_score import ClipScore

            reward = ClipScore.from_options(arch="ViT-L-14" if full else TINY_OPEN_CLIP, pretrained=None,
                                            quick_gelu=full, load_weights=False)
        elif name == "pickscore":
            from transformers import CLIPConfig, CLIPModel

            from rewards.pickscore import PickScoreReward

            cfg = dict(FULL_HF_CLIP if full else TINY_HF_CLIP)
            # the character tokenizer's bos/eos/pad ids, so the text model pools at its eos token
            cfg["text_config"] = dict(cfg["text_config"], bos_token_id=52, eos_token_id=53, pad_token_id=53)
            reward = PickScoreReward(CLIPModel(CLIPConfig(**cfg)), clip_char_tokenizer())
        elif name == "imagereward":
            from rewards.imagereward import ImageRewardConfig, ImageRewardModel, ImageRewardReward

            config = ImageRewardConfig() if full else ImageRewardConfig(**TINY_IR)
            reward = ImageRewardReward(ImageRewardModel(config), blip_bert_tokenizer())
        else:
            raise ValueError(f"unknown reward {name!r}; known: {list(REWARDS)}")
    return reward.to(device).eval()


def measure(name: str, size: str, device: str, amp: torch.dtype | None, images: torch.Tensor, prompts: list[str],
            batch_size: int, repeats: int) -> dict:
    reward = build_reward(name, size, device)
    params = sum(p.numel() for p in reward.parameters())
    n = images.shape[0]

    def autocast():
        return torch.autocast(device_type=torch.device(device).type, dtype=amp) if amp else contextlib.nullcontext()

    def run_loop():  # the reference packages' way: one image per call
        with torch.no_grad(), autocast():
            return torch.cat([reward.score(images[i : i + 1], [prompts[i]]) for i in range(n)])

    def run_batched():
        return reward.score_batched(images, prompts, batch_size=batch_size, autocast=amp)

    loop_scores, batched_scores = run_loop().float(), run_batched().float()
    max_abs_diff = (loop_scores - batched_scores).abs().max().item()
    finite = bool(torch.isfinite(loop_scores).all() and torch.isfinite(batched_scores).all())
    result = interleaved({"loop": run_loop, "batched": run_batched}, repeats, device)
    del reward
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    loop_t, ours_t = result["loop"]["median_s"], result["batched"]["median_s"]
    return {
        "reward": name, "model": REWARDS[name][1] if size == "full" else "tiny", "size": size,
        "params_m": params / 1e6, "num_images": n, "resolution": images.shape[-1], "batch_size": batch_size,
        "dtype": str(amp).replace("torch.", "") if amp else "float32",
        "loop_img_s": n / loop_t, "batched_img_s": n / ours_t, "speedup": loop_t / ours_t,
        "speedup_min": result["loop"]["min_s"] / result["batched"]["min_s"],  # robust to a shared, busy CPU
        "loop_s": loop_t, "batched_s": ours_t,
        "loop_peak_gib": result["loop"]["peak_gib"], "batched_peak_gib": result["batched"]["peak_gib"],
        "max_abs_diff": max_abs_diff, "score_abs_max": loop_scores.abs().max().item(), "finite": finite,
    }  # fmt: skip


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="full" if cuda else "tiny")
    parser.add_argument("--rewards", nargs="*", default=list(REWARDS), choices=list(REWARDS))
    parser.add_argument("--num-images", type=int, default=None, help="default 64 at full size, 32 tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 at full size, 256 tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (median; min in speedup_min)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; 1 is steadier on a shared, busy CPU)")
    parser.add_argument("--autocast", choices=["fp16", "bf16", "none"], default=None,
                        help="autocast dtype of both paths (default fp16 on CUDA, none on CPU)")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    full = args.size == "full"
    n = args.num_images or (64 if full else 32)
    res = args.resolution or (512 if full else 256)
    amp_name = args.autocast or ("fp16" if cuda else "none")
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info())

    gen = torch.Generator("cpu").manual_seed(0)
    images = torch.rand(n, 3, res, res, generator=gen).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    rows, skipped = [], {}
    for name in args.rewards:
        dep = REWARDS[name][0]
        if importlib.util.find_spec(dep) is None:
            skipped[name] = f"{dep} is not installed"
            print(f"note: skipping {name}: {dep} is not installed", flush=True)
            continue
        try:
            rows.append(measure(name, args.size, device, amp, images, prompts, args.batch_size, args.repeats))
        except ImportError as err:
            skipped[name] = f"{type(err).__name__}: {err}"
            print(f"note: skipping {name}: {err}", flush=True)
            continue
        r = rows[-1]
        print(f"{name}: loop {r['loop_img_s']:.1f} img/s, batched {r['batched_img_s']:.1f} img/s, "
              f"x{r['speedup']:.2f}, max|diff| {r['max_abs_diff']:.3g}, finite {r['finite']}", flush=True)
    shown = [r | {"max_abs_diff": f"{r['max_abs_diff']:.2e}"} for r in rows]  # JSON keeps the float
    print_table(shown, ["reward", "model", "params_m", "num_images", "resolution", "batch_size", "dtype",
                       "loop_img_s", "batched_img_s", "speedup", "speedup_min", "loop_peak_gib", "batched_peak_gib",
                       "max_abs_diff", "score_abs_max"])  # fmt: skip
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    settings = vars(args) | {"device": device, "num_images": n, "resolution": res, "autocast": amp_name,
                             "skipped": skipped}
    path = write_json("reward_throughput", rows, settings)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
