"""``imgalign score``: score a folder of images with one or more rewards, write JSON lines.

One record per image: ``{"file", "prompt", "scores": {name: value}, "total"}``; an image
that cannot be read gets ``{"file", "prompt", "error"}`` and the run goes on. With several
rewards the total is the :class:`rewards.CompositeReward` weighted sum (eval mode: fixed
published constants, running statistics frozen at their initial (0, 1) otherwise).
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from imgalign.commands import CommandError

HELP = "Score images with reward models and write one JSON record per image."

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, metavar="NAME[=WEIGHT][,NAME=WEIGHT...]",
                        help="reward name(s) and weights, e.g. hpsv2.1 or hpsv2.1=1,clip=0.5, or a reward.json")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="checkpoint for the reward (only with a single reward)")
    parser.add_argument("--images", required=True, metavar="DIR_OR_GLOB", help="a directory or a glob pattern")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--prompt", default=None, help="one prompt (or edit instruction) for every image")
    group.add_argument("--prompts", default=None, metavar="FILE",
                       help="text file with one prompt per image (sorted file order), or JSON {filename: prompt}")
    parser.add_argument("--source-images", default=None, metavar="DIR",
                        help="source images for edit rewards, matched by file name")
    parser.add_argument("--reference-images", default=None, metavar="DIR",
                        help="reference images for similarity rewards, matched by file name")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl")


def _list_images(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [Path(f) for f in glob.glob(str(p)) if Path(f).is_file()]
    files = sorted(files)
    if not files:
        raise CommandError(f"no images found at {spec!r}")
    return files


def _prompts(args, files: list[Path]) -> list[str | None]:
    if args.prompt is not None:
        return [args.prompt] * len(files)
    if args.prompts is None:
        return [None] * len(files)
    path = Path(args.prompts)
    if not path.is_file():
        raise CommandError(f"--prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise CommandError(f"--prompts {path}: invalid JSON ({err.msg})") from None
        missing = [f.name for f in files if f.name not in mapping]
        if missing:
            raise CommandError(f"--prompts {path} has no prompt for {missing[0]} ({len(missing)} missing)")
        return [str(mapping[f.name]) for f in files]
    lines = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * len(files)
    if len(lines) != len(files):
        raise CommandError(f"--prompts {path} has {len(lines)} prompts for {len(files)} images")
    return lines


def _match(directory: str | None, files: list[Path], option: str) -> list[Path | None]:
    if directory is None:
        return [None] * len(files)
    d = Path(directory)
    if not d.is_dir():
        raise CommandError(f"{option} {d} is not a directory")
    by_stem = {f.stem: f for f in d.iterdir() if f.is_file()}
    out = []
    for f in files:
        m = d / f.name if (d / f.name).is_file() else by_stem.get(f.stem)
        out.append(m)
    return out


def run(args) -> int:
    import rewards

    from imgalign.images import load_image

    try:
        spec = rewards.parse_spec(args.reward) if not args.reward.endswith(".json") else {args.reward: 1.0}
    except ValueError as err:
        raise CommandError(f"--reward: {err}") from None
    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    if args.checkpoint is not None and len(spec) != 1:
        raise CommandError("--checkpoint needs exactly one --reward")
    files = _list_images(args.images)
    prompts = _prompts(args, files)
    sources = _match(args.source_images, files, "--source-images")
    references = _match(args.reference_images, files, "--reference-images")

    import torch
    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if len(spec) == 1:
            (name, weight), = spec.items()
            opts = {"checkpoint": args.checkpoint} if args.checkpoint else {}
            reward = rewards.CompositeReward({name: (rewards.load(name, **opts), weight)}, normalize="none")
        else:
            reward = rewards.load(spec)
    except (ValueError, FileNotFoundError, TypeError) as err:
        raise CommandError(f"cannot load reward {args.reward!r}: {err}") from None
    reward = reward.to(device).eval()
    inputs = reward.info.inputs
    if "prompts" in inputs and prompts[0] is None:
        raise CommandError(f"reward {args.reward!r} needs --prompt or --prompts")
    for key, paired, option in (("source_images", sources, "--source-images"),
                                ("reference_images", references, "--reference-images")):
        if key in inputs and args.__dict__[key] is None:
            raise CommandError(f"reward {args.reward!r} needs {option} DIR")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_err = 0
    with out.open("w", encoding="utf-8") as fh, tqdm(total=len(files), desc="score", unit="img") as bar:
        for start in range(0, len(files), args.batch_size):
            idx = range(start, min(start + args.batch_size, len(files)))
            items, records = [], {}
            for i in idx:
                rec = {"file": str(files[i]), "prompt": prompts[i]}
                try:
                    img = load_image(files[i])
                    cond = {}
                    for key, paired, option in (("source_images", sources, "--source-images"),
                                                ("reference_images", references, "--reference-images")):
                        if key in inputs:
                            if paired[i] is None:
                                raise FileNotFoundError(f"no match for {files[i].name} in {option}")
                            cond[key] = load_image(paired[i])
                    items.append((i, img, cond))
                except Exception as err:  # unreadable image: record it and go on
                    rec["error"] = f"{type(err).__name__}: {err}"
                records[i] = rec
            # images of one shape (and same-shaped conditions) are scored together
            groups: dict[tuple, list] = {}
            for i, img, cond in items:
                key = (tuple(img.shape),) + tuple((k, tuple(v.shape)) for k, v in sorted(cond.items()))
                groups.setdefault(key, []).append((i, img, cond))
            for group in groups.values():
                ids = [g[0] for g in group]
                images = torch.cat([g[1] for g in group]).to(device)
                cond = {k: torch.cat([g[2][k] for g in group]).to(device) for k in group[0][2]}
                texts = [prompts[i] for i in ids] if "prompts" in inputs else None
                try:
                    with torch.no_grad():
                        comps = reward.score_components(images, texts, **cond)
                except ValueError as err:
                    raise CommandError(str(err)) from None
                for j, i in enumerate(ids):
                    records[i]["scores"] = {n: float(v[j]) for n, v in comps.items() if n != "total"}
                    records[i]["total"] = float(comps["total"][j])
            for i in idx:
                n_err += "error" in records[i]
                fh.write(json.dumps(records[i]) + "\n")
            bar.update(len(idx))
    print(f"wrote {len(files)} record(s) to {out}" + (f" ({n_err} unreadable)" if n_err else ""))
    return 0
