"""ShapesVerifier: a learned object-level verifier, used as a differentiable reward.

The caption is split into objects ("a small orange circle on the left") and the verifier is
asked, for each, *is there such an object?*; the reward is the mean log-probability of
"yes". This is the question-answering view of text-image alignment (TIFA, Hu et al. 2023;
VQAScore, Lin et al. 2024) reduced to the Shapes world, where the questions come straight
from the caption's parse. It exists because CLIP-style rewards do not see attribute
*binding*: on held-out prompts the Shapes T2I model paints the other objects of a scene in
the colour of its held-out pair ("an orange circle and a red square" gives two orange
shapes), and ShapesCLIP's caption contrast orders such samples barely better than chance
(its within-prompt agreement with the oracle's colour judgement is in the README).

The model (:class:`ObjectVerifier`) is a small CNN on the image with coordinate channels,
modulated (FiLM, Perez et al. 2018) by an embedding of the query; its per-location logits
are pooled with a log-sum-exp ("somewhere in the image"). Each query field may be "any"
(masked), so one model answers "an orange circle" as well as "a small orange circle on the
left".

Training data are labelled like fine-grained human feedback on objects: rendered scenes of
every colour/kind pair (the T2I model's held-out pairs included: a reward model is trained on
broader data than the generator it aligns) under random degradations, and samples of the
shipped T2I model whose objects the oracle's analysis names (the simulated annotator's
answers). Negatives are one-attribute changes of a present object that match no present
object, so the verifier must check exactly the binding a wrong sample gets wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rewards import Reward, RewardInfo
from torch import nn

from ..images import from_uint8
from .world import COLOURS, KINDS, POSITIONS, SIZES, Scene, parse_caption, render_batch, sample_scene

QUERY_FIELDS = {"colour": COLOURS, "kind": KINDS, "size": SIZES, "position": POSITIONS}
Query = tuple[str | None, str | None, str | None, str | None]  # colour, kind, size, position (None: any)


def encode_queries(queries: Sequence[Query]) -> torch.Tensor:
    """[Q, 4] long: each field's index in its vocabulary, or its vocabulary size for "any"."""
    rows = []
    for query in queries:
        row = []
        for value, (field, vocab) in zip(query, QUERY_FIELDS.items()):
            if value is not None and value not in vocab:
                raise ValueError(f"unknown {field} {value!r}; choose one of {', '.join(vocab)}")
            row.append(len(vocab) if value is None else vocab.index(value))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).view(-1, len(QUERY_FIELDS))


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ObjectVerifier(nn.Module):
    """``logits(images [B,3,H,W] in [0,1], queries [B,Q,4]) -> [B,Q]``: is the queried object there?"""

    def __init__(self, width: int = 32, query_dim: int = 64) -> None:
        super().__init__()
        self.config = {"width": width, "query_dim": query_dim}
        w = width
        self.fields = nn.ModuleList(nn.Embedding(len(v) + 1, query_dim) for v in QUERY_FIELDS.values())
        self.query_mlp = nn.Sequential(nn.Linear(query_dim, query_dim), nn.SiLU(), nn.Linear(query_dim, 4 * w))
        self.stem = nn.Sequential(_block(5, w), _block(w, w), _block(w, 2 * w, stride=2))  # 16x16 for 32 px
        self.after_film = nn.Sequential(_block(2 * w, 2 * w), _block(2 * w, 2 * w, stride=2), _block(2 * w, 2 * w))
        self.out = nn.Conv2d(2 * w, 1, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)
        return self.stem(torch.cat([images * 2 - 1, coords], dim=1))

    def forward(self, images: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)  # [B, C, h, w]
        b, q = queries.shape[:2]
        emb = sum(table(queries[..., i]) for i, table in enumerate(self.fields))  # [B, Q, D]
        gamma, beta = self.query_mlp(emb).view(b, q, 2, -1).unbind(2)  # [B, Q, C] each
        x = feats.unsqueeze(1) * (1 + gamma[..., None, None]) + beta[..., None, None]  # [B, Q, C, h, w]
        x = self.after_film(x.flatten(0, 1))
        logits = self.out(x).flatten(1)  # [B*Q, locations]
        return (torch.logsumexp(logits, dim=1) - math.log(logits.shape[1])).view(b, q)


# --------------------------------------------------------------------------- the reward


def object_query(obj, fields: Sequence[str] = tuple(QUERY_FIELDS)) -> Query:
    """The question about one object (a caption's ``Shape`` or the oracle's ``FoundShape``), asking only about ``fields``."""
    return tuple(getattr(obj, f) if f in fields else None for f in QUERY_FIELDS)  # type: ignore[return-value]


def scene_queries(scene: Scene, fields: Sequence[str]) -> list[Query]:
    """One query per object of the scene, asking only about ``fields``."""
    return [object_query(s, fields) for s in scene.shapes]


class ShapesVerifierReward(Reward):
    """Mean over the caption's objects of ``log p(object present)`` under :class:`ObjectVerifier`.

    ``fields`` chooses what each question checks (default: every attribute of the object, so
    the reward asks for exactly-right objects; ``("colour", "kind")`` asks only for bound
    colour/kind pairs).
    """

    def __init__(self, model: ObjectVerifier, fields: Sequence[str] = tuple(QUERY_FIELDS)) -> None:
        super().__init__()
        unknown = [f for f in fields if f not in QUERY_FIELDS]
        if unknown or not fields:
            raise ValueError(f"fields must be among {', '.join(QUERY_FIELDS)}; got {list(fields)}")
        self.model = model.eval().requires_grad_(False)
        self.fields = tuple(fields)
        suffix = "" if self.fields == tuple(QUERY_FIELDS) else "-" + "-".join(self.fields)
        self.info = RewardInfo(
            name=f"shapes-verifier{suffix}",
            inputs=("images", "prompts"),
            source="imgalign.shapes.verifier: learned per-object verifier (TIFA/VQAScore-style) on the caption's parse",
            score_range=(-math.inf, 0.0),
        )

    def _score(self, images: torch.Tensor, prompts: list[str], **cond) -> torch.Tensor:
        per_prompt = [scene_queries(parse_caption(p), self.fields) for p in prompts]
        width = max(len(q) for q in per_prompt)
        padded = [q + [q[0]] * (width - len(q)) for q in per_prompt]  # repeat a real query; masked below
        queries = encode_queries([q for qs in padded for q in qs]).view(len(prompts), width, -1).to(images.device)
        mask = torch.tensor([[i < len(q) for i in range(width)] for q in per_prompt], device=images.device)
        logp = F.logsigmoid(self.model(images.float(), queries))
        return (logp * mask).sum(1) / mask.sum(1)


def load_verifier(checkpoint: str | Path | None = None) -> ObjectVerifier:
    from safetensors.torch import load_file

    from .manifest import WEIGHTS_DIR

    directory = Path(checkpoint) if checkpoint else WEIGHTS_DIR / "verifier"
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(f"no ShapesVerifier weights in {directory}; build them with `imgalign shapes build --only verifier`")
    config = json.loads((directory / "config.json").read_text())
    model = ObjectVerifier(**config)
    model.load_state_dict({k: v.float() for k, v in load_file(directory / "model.safetensors").items()})
    return model


def shapes_verifier(fields: str | Sequence[str] = tuple(QUERY_FIELDS), checkpoint: str | None = None) -> ShapesVerifierReward:
    """``rewards.load("shapes-verifier", fields="colour,kind")``: see :class:`ShapesVerifierReward`."""
    if isinstance(fields, str):
        fields = tuple(f.strip() for f in fields.replace("+", ",").split(",") if f.strip())
    return ShapesVerifierReward(load_verifier(checkpoint), fields)


# --------------------------------------------------------------------------- training data


def _matches(query: Query, present: Sequence[Query]) -> bool:
    return any(all(q is None or q == p for q, p in zip(query, obj)) for obj in present)


def make_queries(present: Sequence[Query], rng: np.random.Generator, n: int, p_mask: float = 0.25) -> tuple[list[Query], list[float]]:
    """``n`` questions about an image whose objects are ``present``, with their answers.

    Half ask about a present object (each field masked with ``p_mask``); half change one
    field of a present object (or draw a random object) and are kept only if no present
    object answers them, so most negatives differ from the truth in one bound attribute.
    """
    queries, labels = [], []
    vocab = list(QUERY_FIELDS.values())
    while len(queries) < n:
        positive = present and rng.random() < 0.5
        if present:
            base = list(present[int(rng.integers(len(present)))])
        else:
            base = [v[int(rng.integers(len(v)))] for v in vocab]
        if base[1] == "unknown":
            base[1] = None  # a blob the oracle could not classify: ask about its other attributes
        if not positive:
            if rng.random() < 0.85 and present:
                field = int(rng.integers(len(vocab)))
                base[field] = vocab[field][int(rng.integers(len(vocab[field])))]
            else:
                base = [v[int(rng.integers(len(v)))] for v in vocab]
        query = tuple(None if rng.random() < p_mask else value for value in base)
        if all(v is None for v in query):
            continue
        label = _matches(query, present)
        if not positive and label:
            continue  # a "negative" that happens to be true is asked as a positive elsewhere
        queries.append(query)
        labels.append(float(label))
    return queries, labels


def found_objects(images_uint8: np.ndarray) -> list[list[Query] | None]:
    """What the oracle's analysis sees in each image (``None``: no readable background).

    A blob the oracle cannot classify keeps its kind ``"unknown"``.
    """
    from .oracle import analyse

    return [None if a.background is None else [object_query(s) for s in a.shapes] for a in analyse(images_uint8)]


def sample_pool(prompts: Sequence[str], *, seed: int = 0, guidance: Sequence[float] = (1.5, 3.0, 5.0),
                num_steps: int = 10, batch_size: int = 64, pipeline_dir: str | Path | None = None,
                progress: bool = True):  # fmt: skip
    """T2I samples of ``prompts`` (guidance cycling per batch) and the objects the oracle finds in them."""
    from tqdm.auto import tqdm

    from ..images import to_uint8
    from .manifest import WEIGHTS_DIR
    from .t2i import load_pipeline

    adapter = load_pipeline(pipeline_dir or WEIGHTS_DIR / "t2i")
    images = []
    for n, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="sampling T2I", disable=not progress)):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            images.append(adapter.sample(chunk, num_steps=num_steps, guidance_scale=guidance[n % len(guidance)], generator=gens).float())
    u8 = to_uint8(torch.cat(images))
    return u8, found_objects(u8)


def _rendered_batch(n: int, rng: np.random.Generator, generator: torch.Generator) -> tuple[torch.Tensor, list[list[Query]]]:
    from .clip import degrade

    scenes = [sample_scene(rng, split="any") for _ in range(n)]
    images = from_uint8(render_batch(scenes, 32, rng))
    return degrade(images, generator), [scene_queries(sc, tuple(QUERY_FIELDS)) for sc in scenes]


def query_batch(objects: Sequence[Sequence[Query]], rng: np.random.Generator, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [B, per_image, 4] and labels [B, per_image] for images whose objects are ``objects``."""
    queries, labels = zip(*(make_queries(list(objs), rng, per_image) for objs in objects))
    encoded = encode_queries([q for qs in queries for q in qs]).view(len(objects), per_image, -1)
    return encoded, torch.tensor(labels)


def train_verifier(out_dir: str | Path, pool_images: np.ndarray, pool_objects: Sequence[Sequence[Query] | None], *,
                   steps: int = 4000, batch_size: int = 64, queries_per_image: int = 4, lr: float = 1e-3,
                   generated_fraction: float = 0.5, width: int = 32, seed: int = 0, device: str = "cpu") -> Path:  # fmt: skip
    """Train on rendered scenes (any colour/kind pair, degraded) and oracle-read T2I samples.

    ``pool_images``: uint8 [N,32,32,3] T2I samples; ``pool_objects``: what the oracle found in
    each (``None`` entries are skipped). Saves ``config.json`` + ``model.safetensors`` (fp16) atomically.

    The loss first sits on a plateau (the answer rates, predicted without looking) until the
    query modulation takes hold; when it leaves depends on the initial weights, so the default
    budget leaves room: a run cut short soon after a late exit ranks samples barely better
    than chance.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from imgalign.io import atomic_directory
    from imgalign.train.loop import plain_step

    keep = [i for i, objs in enumerate(pool_objects) if objs is not None]
    if not keep and generated_fraction > 0:
        raise ValueError("the pool has no image the oracle could read; sample more T2I images")
    pool = from_uint8(pool_images[keep])
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
        torch.manual_seed(seed)
        model = ObjectVerifier(width=width).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    n_gen = round(batch_size * generated_fraction) if keep else 0
    for step in (bar := tqdm(range(steps), desc="shapes verifier", unit="step")):
        rendered, rendered_objects = _rendered_batch(batch_size - n_gen, rng, generator)
        picks = rng.integers(len(keep), size=n_gen) if n_gen else np.zeros(0, dtype=int)
        images = torch.cat([rendered, pool[picks]])
        queries, labels = query_batch(rendered_objects + [pool_objects[keep[i]] for i in picks], rng, queries_per_image)
        logits = model(images.to(device), queries.to(device))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(device))
        plain_step(loss, model.parameters(), optimizer, schedule)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config))
        save_file({k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    return Path(out_dir)


def within_prompt_agreement(scores: np.ndarray, truth: np.ndarray) -> float:
    """How often the reward orders two samples of one prompt as ``truth`` does (pairs with a difference).

    ``scores``, ``truth``: [prompts, samples]. 0.5 is chance; this is what best-of-N and reward
    gradients within a prompt depend on.
    """
    agree = total = 0
    for s, t in zip(scores, truth):
        i, j = np.triu_indices(len(s), 1)
        differ = t[i] != t[j]
        total += int(differ.sum())
        agree += int(((s[i] > s[j]) == (t[i] > t[j]))[differ].sum())
    return agree / max(total, 1)


def verifier_pool_prompts() -> list[str]:
    """The T2I prompts the verifier's generated images come from: 1000 training prompts and
    the alignment prompts four times (never the evaluation prompts of ``shapes-heldout-eval``)."""
    from ..prompt_sets import prompt_set

    return prompt_set("shapes-train")[:1000] + prompt_set("shapes-heldout-align") * 4


@torch.no_grad()
def evaluate_verifier(checkpoint: str | Path, *, pipeline_dir: str | Path | None = None, n_prompts: int = 50,
                      samples_per_prompt: int = 8, seed: int = 12345) -> dict:  # fmt: skip
    """How well the verifier orders T2I samples of held-out evaluation prompts, as the oracle would.

    Reports within-prompt agreement with the oracle's colour and exact-match judgements, and
    the colour accuracy of the best of ``samples_per_prompt`` under the verifier, next to a
    random pick and the oracle's own best pick (the ceiling). Also its accuracy on rendered
    held-out scenes against one-attribute changes of the caption.
    """
    from ..prompt_sets import prompt_set
    from .clip import ATTRIBUTE_CHOICES, perturb
    from .oracle import judge
    from .world import caption

    reward = ShapesVerifierReward(load_verifier(checkpoint))
    prompts = prompt_set("shapes-heldout-eval")[:n_prompts]
    k = samples_per_prompt
    texts = [p for p in prompts for _ in range(k)]
    u8, _ = sample_pool(texts, seed=seed, guidance=(3.0,), pipeline_dir=pipeline_dir, progress=False)
    images = from_uint8(u8)
    scores = reward.score_batched(images, texts, batch_size=64).numpy().reshape(-1, k)
    judgements = judge(u8, texts)
    out: dict = {"eval": f"{len(prompts)} shapes-heldout-eval prompts x {k} T2I samples (10 steps, guidance 3)"}
    rows = np.arange(len(prompts))
    for aspect in ("colour", "exact"):
        truth = np.array([float(getattr(j, aspect)) for j in judgements]).reshape(-1, k)
        out[f"within_prompt_agreement_{aspect}"] = round(within_prompt_agreement(scores, truth), 3)
        out[f"best_of_{k}_{aspect}"] = {"random": round(float(truth.mean()), 3),
                                        "verifier": round(float(truth[rows, scores.argmax(1)].mean()), 3),
                                        "oracle": round(float(truth.max(1).mean()), 3)}  # fmt: skip
    rng = np.random.default_rng(seed)
    scenes = [parse_caption(p) for p in prompt_set("shapes-heldout")[:200]]
    renders = from_uint8(render_batch(scenes, 32, rng))
    true = reward.score_batched(renders, [caption(s, rng) for s in scenes], batch_size=100)
    out["rendered_heldout_vs_one_change"] = {}
    for field in ATTRIBUTE_CHOICES:
        false = reward.score_batched(renders, [caption(perturb(s, rng, field), rng) for s in scenes], batch_size=100)
        out["rendered_heldout_vs_one_change"][field] = round(float((true > false).float().mean()), 3)
    return out
