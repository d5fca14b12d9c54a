"""``imgalign sample``: generate images through a pipeline adapter.

Seeding convention: image ``i`` of a run (counting over all prompts and repeats) starts from
``torch.Generator("cpu").manual_seed(seed + i)``, so image 0 with seed S is what
``pipe(..., generator=torch.Generator("cpu").manual_seed(S))`` returns.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import CommandError, add_output_arguments, blame, prepare_out, resolve_device

if TYPE_CHECKING:
    from ..sampling.segments import SegmentRouting

HELP = "Generate images with a diffusers pipeline (PNG files, samples.jsonl, grid.png)."
#: What sample writes into --out (what --overwrite removes); see imgalign.outputs.
OUTPUTS = ("[0-9][0-9][0-9][0-9]*.png", "samples.jsonl", "grid.png")
# imgalign.sampling.SAMPLERS, spelled out so that parsing arguments does not import torch.
SAMPLER_CHOICES = ["ode", "combined", "aig", "best-of-n", "segments", "noise-search", "path-search", "speculative"]
REWARD_SAMPLERS = ("best-of-n", "noise-search", "path-search", "speculative")  # imgalign.sampling.REWARD_SAMPLERS

# Names come from pipelines.register and installed packages' "imgalign.pipelines" entry points.
PIPELINE_HELP = "pipeline directory, hub id, or registered name ('shapes', 'shapes-edit' = the shipped Shapes models)"

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help=PIPELINE_HELP)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="one prompt")
    text.add_argument("--prompts", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--instruction", help="edit instruction (edit pipelines; same as --prompt)")
    parser.add_argument("--image", type=Path, help="source image for edit pipelines")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the family's)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4, help="images generated together (default 4)")
    add_lora_arguments(parser)
    parser.add_argument("--sampler", default="ode", choices=SAMPLER_CHOICES,
                        help="ode: the pipeline's own loop; combined: base model for the first --switch-step "
                             "steps, then the LoRA; aig: s*base + (1-s)*tuned with s = 1-(i/T)^p (needs --lora); "
                             "best-of-n: the best of --best-of samples under --sampler-reward; segments: each "
                             "noise-level segment runs its own LoRA (timestep-segment DPO); noise-search, "
                             "path-search, speculative: test-time search under --sampler-reward (see --search-*, "
                             "--branches/--path-*, --prune-*)")
    parser.add_argument("--switch-step", type=int, default=None,
                        help="combined: steps run by the base model (default: 3/4 of --steps, ImageReFL's 30/40)")
    parser.add_argument("--aig-power", type=float, default=1.0, help="aig: the power p (default 1)")
    add_best_of_n_arguments(parser)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "flash", "math"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_output_arguments(parser)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", metavar="DIR | segK=DIR",
                        help="a diffusers-format LoRA directory to load; with --sampler segments also segK=DIR "
                             "(repeat; segment k's LoRA, seg0 = the lowest noise levels) or a directory holding "
                             "routing.json (imgalign train tpo writes one)")
    parser.add_argument("--segments", default=None, metavar="0,0.5,1",
                        help="segments: noise-level boundaries of the segK LoRAs (default: an even split)")
    parser.add_argument("--skip", action="append", default=None, metavar="segK:STEPS",
                        help="segments: run segment k with STEPS evenly spaced steps over its noise range (repeat)")


def add_best_of_n_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--best-of", type=int, default=4,
                        help="best-of-n, speculative, noise-search: candidates per image (per round for noise-search); "
                             "path-search: paths kept (default 4)")
    parser.add_argument("--sampler-reward", default=None,
                        help="best-of-n and the search samplers: the reward that picks (a name or directory)")
    search = parser.add_argument_group("search samplers (imgalign.sampling.search; defaults: the sampler's)")
    for flag, kind, text in SEARCH_FLAGS:
        search.add_argument(flag, type=kind, default=None, help=text)


# flag, type, help; SEARCH_OPTIONS maps each to (sampler, keyword of the sampler function).
SEARCH_FLAGS = [
    ("--search-method", str, "noise-search: smart (Smart-GRPO's Gaussian refit on one-step decodes, default) "
                             "or zero-order (Ma et al. 2025: full samples around a pivot noise)"),
    ("--search-rounds", int, "noise-search: rounds (default 3)"),
    ("--search-keep", int, "noise-search smart: candidates kept per round to refit the Gaussian (default n/4)"),
    ("--search-smoothing", float, "noise-search smart: s in mu <- s*mu + (1-s)*mean(kept) (default 0.5)"),
    ("--search-std-floor", float, "noise-search smart: the lowest sigma (default 0.5)"),
    ("--search-radius", float, "noise-search zero-order: neighbourhood sqrt(1-r^2)*pivot + r*eps (default 0.5)"),
    ("--branches", int, "path-search: re-noised branches per path and round (default 2)"),
    ("--path-start", int, "path-search: the step where branching starts (default steps/4)"),
    ("--path-backtrack", int, "path-search: steps re-noised back per round (default steps/10, at least 1)"),
    ("--path-advance", int, "path-search: steps denoised per round from the re-noised level (default: 3 rounds)"),
    ("--prune-at", str, "speculative: comma-separated steps before which to prune (default steps/3,2*steps/3; "
                        "'' for none)"),
    ("--prune-fraction", float, "speculative: fraction of live candidates dropped at each pruning (default 0.5)"),
]
SEARCH_OPTIONS = {
    "search_method": ("noise-search", "method"), "search_rounds": ("noise-search", "rounds"),
    "search_keep": ("noise-search", "keep"), "search_smoothing": ("noise-search", "smoothing"),
    "search_std_floor": ("noise-search", "std_floor"), "search_radius": ("noise-search", "radius"),
    "branches": ("path-search", "branches"), "path_start": ("path-search", "start"),
    "path_backtrack": ("path-search", "backtrack"), "path_advance": ("path-search", "advance"),
    "prune_at": ("speculative", "prune_at"), "prune_fraction": ("speculative", "prune_fraction"),
}  # fmt: skip
SMART_ONLY, ZERO_ORDER_ONLY = ("keep", "smoothing", "std_floor"), ("radius",)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def search_options(args: argparse.Namespace) -> dict[str, Any]:
    """The search sampler's keywords from its flags; a flag of another sampler is an error."""
    options: dict[str, Any] = {}
    for dest, (sampler, key) in SEARCH_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if sampler != args.sampler:
            raise CommandError(f"{_flag(dest)} is an option of --sampler {sampler}, not {args.sampler}")
        if key == "prune_at":
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise CommandError(f"--prune-at takes comma-separated step numbers (e.g. 3,6), got {value!r}") from None
        options[key] = value
    if args.sampler == "noise-search":
        method = options.get("method", "smart")
        other = ZERO_ORDER_ONLY if method == "smart" else SMART_ONLY
        for key in other:
            if key in options:
                raise CommandError(f"--search-{key.replace('_', '-')} is not an option of --search-method {method}")
    return options


def sampler_options(args: argparse.Namespace) -> dict:
    """Checks the sampler flags; returns the reward samplers' keywords for ``run_sampler`` (empty otherwise)."""
    if args.sampler in ("combined", "aig") and args.lora is None:
        raise CommandError(f"--sampler {args.sampler} mixes the base model and a LoRA: give --lora DIR")
    search = search_options(args)
    if args.sampler not in REWARD_SAMPLERS:
        return {}
    if args.sampler_reward is None:
        raise CommandError(f"--sampler {args.sampler} needs --sampler-reward NAME (the reward that picks the best)")
    if args.best_of < 1:
        raise CommandError(f"--best-of must be >= 1, got {args.best_of}")
    options: dict[str, Any] = {"n": args.best_of}
    if args.sampler != "best-of-n":
        from ..sampling import check_search_options

        try:
            check_search_options(args.sampler, n=args.best_of, num_steps=args.steps, **search)
        except ValueError as err:
            raise CommandError(f"--sampler {args.sampler}: {err}") from None
        options["search"] = search
    import rewards

    return {"reward": rewards.load(args.sampler_reward), **options}


SEGMENT_NAME = re.compile(r"seg(\d+)")


@dataclass
class LoraChoice:
    """The LoRAs that --lora, --segments and --skip ask for, and the segment routing (``--sampler segments``)."""

    directory: Path | None = None  # one LoRA (loaded as "default"), or the directory holding routing.json
    named: dict[int, Path] = field(default_factory=dict)  # --lora segK=DIR
    routing: SegmentRouting | None = None  # --sampler segments only
    skip: dict[int, int] = field(default_factory=dict)
    from_routing_file: bool = False

    def load(self, adapter: Any) -> None:
        import pipelines

        from ..sampling import load_segment_loras

        if self.from_routing_file:
            load_segment_loras(adapter, self.routing, self.directory)
        elif self.directory is not None:
            pipelines.load_lora(adapter, self.directory)
        for k, directory in self.named.items():
            pipelines.load_lora(adapter, directory, adapter_name=f"seg{k}")

    def record(self) -> dict[str, Any]:
        """What a per-image record says about the LoRAs (and, for the segments sampler, the routing)."""
        lora: Any = str(self.directory) if self.directory is not None else None
        if self.named:
            lora = {f"seg{k}": str(d) for k, d in sorted(self.named.items())}
        record: dict[str, Any] = {"lora": lora}
        if self.routing is not None:
            record["routing"] = {"boundaries": list(self.routing.boundaries), "adapters": list(self.routing.adapters)}
            record["skip"] = {f"seg{k}": n for k, n in sorted(self.skip.items())}
        return record


def lora_choice(args: argparse.Namespace) -> LoraChoice:
    """Parse --lora (DIR, segK=DIR, or a routing directory), --segments and --skip; fail before any model loads."""
    from ..sampling.segments import ROUTING_FILE, SegmentRouting, load_routing

    plain: list[Path] = []
    named: dict[int, Path] = {}
    for entry in args.lora or []:
        name, sep, directory = entry.partition("=")
        if not sep or Path(entry).exists():
            plain.append(Path(entry))
            continue
        k = _segment_index(name, f"--lora {entry}")
        if k in named:
            raise CommandError(f"--lora seg{k}=... is given twice")
        named[k] = Path(directory)
    if len(plain) > 1 or (plain and named):
        raise CommandError("give one --lora DIR, or one LoRA per segment: --lora seg0=DIR --lora seg1=DIR ...")
    directory = plain[0] if plain else None
    has_routing_file = directory is not None and (directory / ROUTING_FILE).is_file()
    for path in list(named.values()) or plain:
        if not path.is_dir():
            raise CommandError(f"LoRA directory not found: {path}")
    if args.sampler != "segments":
        if named or has_routing_file:
            raise CommandError("segment LoRAs (--lora segK=DIR, or a directory with routing.json) need --sampler segments")
        if args.segments is not None or args.skip:
            raise CommandError("--segments and --skip are options of --sampler segments")
        return LoraChoice(directory=directory)

    if named:
        boundaries = _boundaries(args.segments) if args.segments is not None else None
        count = len(boundaries) - 1 if boundaries is not None else max(named) + 1
        if max(named) >= count:
            raise CommandError(f"--lora seg{max(named)}=... but --segments {args.segments} makes {count} segments (seg0..seg{count - 1})")
        adapters = [f"seg{k}" if k in named else None for k in range(count)]
        routing = SegmentRouting.even(adapters) if boundaries is None else SegmentRouting(boundaries, adapters)
    elif args.segments is not None:
        raise CommandError("--segments splits LoRAs given as --lora seg0=DIR --lora seg1=DIR ...; "
                           "a routing.json or a single --lora DIR brings its own segments")  # fmt: skip
    elif has_routing_file:
        routing = load_routing(directory)
        for name in dict.fromkeys(n for n in routing.adapters if n is not None):
            if not (directory / name).is_dir():
                raise CommandError(f"LoRA directory not found: {directory / name} (named in {directory / ROUTING_FILE})")
    elif directory is not None:
        routing = SegmentRouting([0.0, 1.0], ["default"])  # one segment: the plain LoRA sampler
    else:
        raise CommandError("--sampler segments needs LoRAs: --lora seg0=DIR --lora seg1=DIR ..., "
                           "or --lora DIR holding routing.json")  # fmt: skip
    skip = _skip_counts(args.skip or [], routing)
    return LoraChoice(directory, named, routing, skip, from_routing_file=has_routing_file and not named)


def _skip_counts(entries: list[str], routing: SegmentRouting) -> dict[int, int]:
    """--skip segK:STEPS entries -> {k: STEPS}."""
    skip: dict[int, int] = {}
    for entry in entries:
        name, sep, steps = entry.partition(":")
        k = _segment_index(name, f"--skip {entry}")
        if not sep or not steps.strip().lstrip("-").isdigit():
            raise CommandError(f"--skip takes segK:STEPS (e.g. seg1:10), got {entry!r}")
        if k >= routing.num_segments:
            raise CommandError(f"--skip {entry}: no segment {k} (segments: seg0..seg{routing.num_segments - 1})")
        if int(steps) < 1:
            raise CommandError(f"--skip {entry}: a segment needs at least 1 step")
        if k in skip:
            raise CommandError(f"--skip seg{k}:... is given twice")
        skip[k] = int(steps)
    return skip


def _segment_index(name: str, where: str) -> int:
    match = SEGMENT_NAME.fullmatch(name.strip())
    if match is None:
        raise CommandError(f"unknown segment name {name!r} in {where}; segments are seg0, seg1, ... (seg0 = lowest noise)")
    return int(match[1])


def _boundaries(text: str) -> list[float]:
    from ..sampling import SegmentRouting

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise CommandError(f"--segments takes noise levels from 0 to 1, comma separated (e.g. 0,0.5,1), got {text!r}") from None
    try:
        SegmentRouting(values, [None] * (len(values) - 1))
    except ValueError as exc:
        raise CommandError(f"--segments {text}: {exc}") from None
    return values


def check_values(args: argparse.Namespace, counts: dict[str, int | None]) -> None:
    """Refuse bad option values where they enter, before anything loads: one error naming the option.

    ``counts`` maps option names to values that must be whole numbers >= 1 (None: not given).
    ``--height`` / ``--width`` must be positive and ``--guidance`` (and ``--aig-power``) finite and >= 0.
    """
    for option, value in counts.items():
        if value is not None and value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    for option, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise CommandError(f"{option} must be a positive number of pixels, got {value}")
    for option, value in (("--guidance", args.guidance), ("--aig-power", getattr(args, "aig_power", None))):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise CommandError(f"{option} must be a finite number >= 0, got {value}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The run's prompts from --prompt / --instruction / --prompts (blank lines skipped)."""
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise CommandError(f"prompt file not found: {args.prompts}")
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        if not prompts:
            raise CommandError(f"prompt file is empty: {args.prompts}")
        return prompts
    text = args.prompt if args.prompt is not None else args.instruction
    if text is None:
        raise CommandError("give --prompt TEXT, --prompts FILE or (for edit pipelines) --instruction TEXT")
    return [text]


def _resumable(out: Path, expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished records of the interrupted run in ``out`` (a changed option is a one-line error)."""
    from ..outputs import OutputExistsError, resumable_records

    try:
        return resumable_records(out, expected)
    except OutputExistsError as err:
        raise CommandError(str(err)) from None


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import pipelines

    from ..images import load_image, save_grid, save_png
    from ..outputs import JsonlAppender, clear_outputs
    from ..sampling import plan_segments, run_sampler

    check_values(args, {"--num-images": args.num_images, "--steps": args.steps, "--batch-size": args.batch_size})
    prompts = read_prompts(args)
    resuming = prepare_out(args, OUTPUTS, clear=False)  # refuse a used --out before anything loads
    best_of_n = sampler_options(args)
    loras = lora_choice(args)
    switch_step = args.switch_step if args.switch_step is not None else (3 * args.steps) // 4
    if args.sampler == "combined" and not 0 <= switch_step <= args.steps:
        raise CommandError(f"--switch-step must be in [0, --steps={args.steps}], got {switch_step}")
    if args.sampler == "aig" and args.aig_power < 0:
        raise CommandError("--aig-power must be >= 0")
    device = resolve_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    with blame("--pipeline", args.pipeline):
        adapter = pipelines.load(args.pipeline, dtype=dtype, device=device, attention=args.attention)
    with blame("--lora"):
        loras.load(adapter)
    source = None
    if adapter.is_edit:
        if args.image is None:
            raise CommandError(f"{adapter.family} is an edit pipeline: give --image SRC and --instruction TEXT")
        with blame("--image", args.image):
            source = load_image(args.image, expected_side=min(adapter.default_size()))
    elif args.image is not None:
        raise CommandError(f"--image is only for edit pipelines; {adapter.family} is text-to-image")
    height, width = args.height, args.width
    if source is not None:
        height, width = height or source.shape[-2], width or source.shape[-1]
    with blame("--height/--width"):
        height, width = adapter.check_size(height, width)  # fail fast, before any model call
    segment_record = {}
    if loras.routing is not None:  # also checks --skip against the schedule before any model call
        plan = plan_segments(adapter, loras.routing, args.steps, skip=loras.skip, height=height, width=width)
        segment_record = {"function_evaluations": plan.function_evaluations, "steps_per_segment": plan.steps_per_segment}

    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_images))]
    picked = args.sampler in REWARD_SAMPLERS  # records also get the pick's score and the evaluations spent

    def settings(index: int, prompt: str, seed: int) -> dict[str, Any]:
        """What record ``index`` says before its image exists (a resumed run must say the same)."""
        record = {"file": f"{index:04d}.png", "prompt": prompt, "seed": seed, "steps": args.steps,
                  "guidance": args.guidance, "height": height, "width": width,
                  "pipeline": str(args.pipeline), **loras.record(), "sampler": args.sampler}  # fmt: skip
        if args.sampler == "combined":
            record["switch_step"] = switch_step
        elif args.sampler == "aig":
            record["aig_power"] = args.aig_power
        elif picked:
            record.update(best_of=args.best_of, sampler_reward=args.sampler_reward,
                          **({"search": best_of_n["search"]} if "search" in best_of_n else {}))  # fmt: skip
        elif args.sampler == "segments":
            record.update(segment_record)
        return record

    expected = [settings(i, p, s) for i, (p, s) in enumerate(jobs)]
    done = _resumable(args.out, expected) if resuming else []
    if args.overwrite:
        clear_outputs(args.out, OUTPUTS)
    args.out.mkdir(parents=True, exist_ok=True)
    log = JsonlAppender(args.out / "samples.jsonl", done)  # a torn last record of an interrupted run is dropped
    records = list(done)
    images = [load_image(args.out / r["file"])[0] for r in done]
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} image(s) already in {args.out}")
    # progress bars on a terminal only (disable=None), not in logs or tests
    with tqdm(total=len(jobs), initial=len(done), desc="sampling", unit="img", disable=None) as bar:
        for start in range(len(done), len(jobs), args.batch_size):
            batch = jobs[start : start + args.batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            extra = {}
            if source is not None:
                extra["image"] = source.expand(len(batch), -1, -1, -1).to(device)
            common = dict(num_steps=args.steps, height=height, width=width, generator=generators, **guidance, **extra)
            out = run_sampler(args.sampler, adapter, [p for p, _ in batch], switch_step=switch_step,
                              aig_power=args.aig_power, routing=loras.routing, skip=loras.skip, **best_of_n,
                              return_output=picked, **common)  # fmt: skip
            for k, image in enumerate((out.images if picked else out).cpu()):
                record = dict(expected[start + k])
                save_png(image, args.out / record["file"])  # atomic: complete, or absent
                if picked:
                    record.update(score=float(out.scores[k]), nfe=int(out.nfe[k]))
                log.add(record)
                records.append(record)
                images.append(image)
            log.commit()  # the batch's records, after its images: an interrupted run stays consistent
            bar.update(len(batch))
    save_grid(images, args.out / "grid.png", captions=[r["prompt"] for r in records],
              scores=[r.get("score") for r in records] if picked else None)  # fmt: skip
    print(f"wrote {len(records)} images, samples.jsonl and grid.png to {args.out}")
    return 0
