"""``imgalign score``: score a folder of images with one or more rewards, write JSON lines.

One record per image: ``{"file", "prompt", "scores": {name: value}, "total"}``; an image
that cannot be read gets ``{"file", "prompt", "error"}`` and the run goes on. With several
rewards the total is the :class:`rewards.CompositeReward` weighted sum (eval mode: fixed
published constants, running statistics frozen at their initial (0, 1) otherwise).

Pointed at the output directory of ``imgalign sample`` or ``eval``, it scores the images that
``samples.jsonl`` lists, each with its own prompt (unless --prompt/--prompts say otherwise),
and never the grids; in any directory ``grid.png`` and hidden files are skipped. Records are
flushed batch by batch; an existing ``--out`` needs ``--resume`` (score only the images not
yet in it) or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from imgalign.commands import CommandError, blame, resolve_device

HELP = "Score images with reward models and write one JSON record per image."

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Pictures imgalign writes about images rather than images to score (sample/eval grids).
NOT_SAMPLES = ("grid.png",)


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
    parser.add_argument("--device", "--reward-device", dest="device", default=None,
                        help="the reward's device: cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl")
    parser.add_argument("--resume", action="store_true", help="--out exists: score only the images not yet in it")
    parser.add_argument("--overwrite", action="store_true", help="--out exists: replace it")


def _list_images(spec: str) -> tuple[list[Path], dict[str, str]]:
    """The images to score, and the prompt of each (by file name) when ``spec`` is a sample/eval output."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "samples.jsonl").is_file():
        from imgalign.outputs import read_jsonl

        try:
            records = [r for r in read_jsonl(p / "samples.jsonl") if isinstance(r, dict) and r.get("file")]
        except ValueError as err:
            raise CommandError(f"--images {spec}: {err}") from None
        files = [p / r["file"] for r in records if (p / r["file"]).is_file()]
        if not files:
            raise CommandError(f"--images {spec}: samples.jsonl lists no image that exists")
        return files, {r["file"]: r["prompt"] for r in records if isinstance(r.get("prompt"), str)}
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                 and f.name not in NOT_SAMPLES and not f.name.startswith(".")]  # fmt: skip
    else:
        files = [Path(f) for f in glob.glob(str(p)) if Path(f).is_file()]
    files = sorted(files)
    if not files:
        raise CommandError(f"--images: no images found at {spec!r}")
    return files, {}


def _prompts(args, files: list[Path], recorded: dict[str, str]) -> list[str | None]:
    if args.prompt is not None:
        return [args.prompt] * len(files)
    if args.prompts is None:
        return [recorded.get(f.name) for f in files]
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
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint is not None and len(spec) != 1:
        raise CommandError("--checkpoint needs exactly one --reward")
    from imgalign.outputs import OutputExistsError, prepare_output_file, read_jsonl

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise CommandError("give --resume (continue --out) or --overwrite (replace it), not both")
    try:  # refuse a used --out before anything loads (--overwrite removes it only once scoring starts)
        resuming = prepare_output_file(out, resume=args.resume, overwrite=False) if not args.overwrite else False
    except OutputExistsError as err:
        raise CommandError(str(err)) from None
    if args.overwrite and out.is_dir():
        raise CommandError(f"--out {out} is a directory; give a file name (e.g. {out / 'scores.jsonl'})")
    files, recorded = _list_images(args.images)
    prompts = _prompts(args, files, recorded)
    sources = _match(args.source_images, files, "--source-images")
    references = _match(args.reference_images, files, "--reference-images")

    import torch
    from tqdm import tqdm

    device = torch.device(resolve_device(args.device))
    with blame(*(("--reward", args.reward) if args.checkpoint is None else ("--checkpoint", args.checkpoint))):
        if len(spec) == 1:
            (name, weight), = spec.items()
            opts = {"checkpoint": args.checkpoint} if args.checkpoint else {}
            reward = rewards.CompositeReward({name: (rewards.load(name, **opts), weight)}, normalize="none")
        else:
            reward = rewards.load(spec)
    reward = reward.to(device).eval()
    inputs = reward.info.inputs
    if "prompts" in inputs and prompts[0] is None:
        raise CommandError(f"reward {args.reward!r} needs --prompt or --prompts")
    for key, paired, option in (("source_images", sources, "--source-images"),
                                ("reference_images", references, "--reference-images")):
        if key in inputs and args.__dict__[key] is None:
            raise CommandError(f"reward {args.reward!r} needs {option} DIR")

    from imgalign.outputs import JsonlAppender

    done = {r.get("file") for r in read_jsonl(out)} if resuming else set()
    kept = [r for r in read_jsonl(out) if r.get("file") in {str(f) for f in files}] if resuming else []
    todo = [i for i in range(len(files)) if str(files[i]) not in done]
    if resuming:
        print(f"resuming: {len(files) - len(todo)} of {len(files)} image(s) already scored in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = JsonlAppender(out, kept)  # --overwrite: the old file is replaced here; --resume: a torn line is dropped
    expected_side = _expected_side(reward)
    small: list[str] = []  # images far smaller than the reward's input: one warning for all, at the end
    n_err = 0
    # progress bars on a terminal only (disable=None), not in logs or tests
    with tqdm(total=len(files), initial=len(files) - len(todo), desc="score", unit="img", disable=None) as bar:
        for start in range(0, len(todo), args.batch_size):
            idx = todo[start : start + args.batch_size]
            items, records = [], {}
            for i in idx:
                rec = {"file": str(files[i]), "prompt": prompts[i]}
                try:
                    img = load_image(files[i])
                    if expected_side and 4 * min(img.shape[-2:]) < expected_side:
                        small.append(f"{files[i].name} ({img.shape[-1]}x{img.shape[-2]})")
                    cond = {}
                    for key, paired, option in (("source_images", sources, "--source-images"),
                                                ("reference_images", references, "--reference-images")):
                        if key in inputs:
                            if paired[i] is None:
                                raise FileNotFoundError(f"no match for {files[i].name} in {option}")
                            cond[key] = load_image(paired[i])
                    items.append((i, img, cond))
                except (OSError, ValueError) as err:  # unreadable image: record it and go on
                    rec["error"] = f"{type(err).__name__}: {' '.join(str(err).split())}"
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
                except (ConnectionError, TimeoutError) as err:  # a served reward that went away
                    raise CommandError(f"{' '.join(str(err).split())} -- the images scored so far are in {out}: "
                                       "rerun the same command with --resume once the reward is reachable") from None
                for j, i in enumerate(ids):
                    records[i]["scores"] = {n: float(v[j]) for n, v in comps.items() if n != "total"}
                    records[i]["total"] = float(comps["total"][j])
            for i in idx:
                n_err += "error" in records[i]
                log.add(records[i])
            log.commit()
            bar.update(len(idx))
    print(f"wrote {len(files)} record(s) to {out}" + (f" ({n_err} unreadable)" if n_err else ""))
    if small:
        import warnings

        warnings.warn(f"{len(small)} image(s) are far smaller than the reward's {expected_side} px input and were "
                      f"upscaled before scoring (e.g. {small[0]}); their scores judge interpolation blur", stacklevel=1)
    if n_err == len(todo) and todo:
        raise CommandError(f"--images {args.images}: none of the {len(todo)} image(s) could be read "
                           f"(see the errors in {out})")  # fmt: skip
    return 0


def _expected_side(reward) -> int | None:
    """The input side of the reward's image model, where it says (to warn about far smaller images)."""
    sizes = []
    for module in reward.modules():
        size = getattr(module, "image_size", None) or getattr(getattr(module, "visual", None), "image_size", None)
        size = size[0] if isinstance(size, (tuple, list)) else size
        if isinstance(size, int) and size > 0:
            sizes.append(size)
    return max(sizes) if sizes else None
