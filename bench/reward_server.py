"""Figure: scoring through ``imgalign serve-reward`` vs scoring in-process (throughput ratio).

Baseline: ``reward.score_batched(images, prompts, batch_size=B)`` in this process. Ours: the
same reward object served by :class:`rewards.server.RewardServer` on 127.0.0.1 (its threads
in this process) and called through ``rewards.load("remote:http://...")``:

* ``remote safetensors``: float32 tensors on the wire (exact scores);
* ``remote png``: 8-bit PNGs on the wire;
* ``remote, K clients``: the N images split over K concurrent clients, each sending its share
  in requests of ``B / K`` images, so the server's worker concatenates them into batches.

Images/s of each and the ratio to in-process (1.0 = no overhead); the max |score difference|
to in-process (0 for tensors). The reward is open_clip's CLIP-score architecture with random
weights: ``--size tiny`` (default on CPU, the tests' config at 224 px) or ``--size base``
(ViT-B-32 sized), so the overhead is shown against a cheap and a mid-sized model.

    python bench/reward_server.py                  # CPU: tiny, N=64 at 224x224, batch 16
    python bench/reward_server.py --size base --device cuda
"""

from __future__ import annotations

import argparse
import threading

import torch

from common import interleaved, machine_info, print_table, write_json  # noqa: I001

PROMPTS = ["a photo of a cat", "a red cube", "a dog", "a photo of a red dog", "a cat of a dog", "a cube"]
SIZES = {
    "tiny": {"embed_dim": 16,
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "base": {"embed_dim": 512,
             "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
}  # fmt: skip


def build_reward(size: str, device: str):
    from rewards.clip_score import ClipScore

    torch.manual_seed(0)
    return ClipScore.from_options(arch=SIZES[size], pretrained=None, load_weights=False).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import rewards
    from rewards.server import RewardServer

    reward = build_reward(args.size, args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.num_images, 3, args.resolution, args.resolution, generator=g)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_images)]
    B, K = args.batch_size, args.clients
    with RewardServer(reward, max_batch=B, queue_size=4 * K) as server:
        exact = rewards.load(f"remote:{server.url}", max_images=B)
        png = rewards.load(f"remote:{server.url}", max_images=B, format="png")
        shared = rewards.load(f"remote:{server.url}", max_images=max(B // K, 1))
        shares = [list(range(k, args.num_images, K)) for k in range(K)]

        def many_clients():
            out = torch.empty(args.num_images)

            def run(rows):
                out[rows] = shared(images[rows], [prompts[i] for i in rows])

            threads = [threading.Thread(target=run, args=(rows,)) for rows in shares]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return out

        reference = reward.score_batched(images, prompts, batch_size=B).cpu()
        fns = {
            "in-process": lambda: reward.score_batched(images, prompts, batch_size=B),
            "remote safetensors": lambda: exact(images, prompts),
            "remote png": lambda: png(images, prompts),
            f"remote, {K} clients": many_clients,
        }
        results = interleaved(fns, args.repeats, args.device)
        differences = {name: float((fn().cpu() - reference).abs().max()) for name, fn in fns.items()}
        largest = server.health()["largest_batch"]
    base = results["in-process"]["median_s"]
    rows = [{"path": name, "images/s": args.num_images / r["median_s"], "median s": r["median_s"],
             "ratio to in-process": base / r["median_s"], "max |diff|": differences[name]}
            for name, r in results.items()]  # fmt: skip
    print(f"{args.size} CLIP-score, {args.num_images} images at {args.resolution}px, batch {B}, device {args.device}, "
          f"largest server batch {largest}; {machine_info()}")  # fmt: skip
    print_table(rows, ["path", "images/s", "median s", "ratio to in-process", "max |diff|"])
    path = write_json("reward_server", rows, {**vars(args), "largest_server_batch": largest})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
