"""The Shapes world: typed scenes of coloured shapes, their captions, renders and edits.

Everything an image generator is asked for here can be checked exactly by
:mod:`imgalign.shapes.oracle`, which is the point of the world: it lets us measure
whether alignment improved the truth rather than a learned reward.

Grammar (all attributes are always explicit, so a caption pins down one scene)::

    caption  := wrapper(OBJECTS, BG)
    OBJECTS  := OBJ | OBJ " and " OBJ | OBJ ", " OBJ " and " OBJ | GROUP
    OBJ      := "a" SIZE COLOUR KIND POS          "a small red circle on the left"
    GROUP    := COUNT SIZE COLOUR KIND "s" POS ("," | "and") POS ...
                                               "two large blue squares on the left and on the right"
    POS      := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"

Layout rule: each shape occupies one of five anchor slots (top, left, centre, right,
bottom), no two shapes share a slot, and two shapes may only sit in neighbouring slots
when both fit there with a gap (in practice: any two small shapes fit anywhere, a large
shape only fits alone or opposite another shape). Shapes therefore never touch, which is
what makes per-object judging exact.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

__all__ = [
    "KINDS",
    "COLOURS",
    "PALETTE",
    "SIZES",
    "POSITIONS",
    "HELDOUT_PAIRS",
    "Geometry",
    "GEOMETRY",
    "Shape",
    "Scene",
    "LayoutError",
    "is_valid",
    "render",
    "render_batch",
    "caption",
    "parse_caption",
    "sample_scene",
    "prompt_set",
    "sample_edit",
    "parse_instruction",
    "make_dataset",
    "N_CAPTION_TEMPLATES",
    "N_EDIT_TEMPLATES",
]

KINDS: tuple[str, ...] = ("circle", "square", "triangle")

# Well separated in RGB (minimum pairwise distance ~106) so nearest-colour segmentation
# with a 50-unit threshold is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "orange": (240, 120, 0),
    "yellow": (250, 225, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 50, 200),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.uint8)
COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}

SIZES: tuple[str, ...] = ("small", "large")
# Canonical (reading) order: captions list shapes in this order.
POSITIONS: tuple[str, ...] = ("top", "left", "centre", "right", "bottom")
POSITION_INDEX = {p: i for i, p in enumerate(POSITIONS)}

POSITION_PHRASE: dict[str, str] = {
    "top": "at the top",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom": "at the bottom",
}
PHRASE_POSITION = {v: k for k, v in POSITION_PHRASE.items()}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
MAX_SHAPES = 3

# Colour/kind pairs that never occur in the "train" split: the held-out prompt set asks
# for them, so it measures compositional generalisation, not memorisation.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)


@dataclass(frozen=True)
class Geometry:
    """Layout constants in units of a 32-pixel canvas (scaled for other sizes)."""

    canvas: float = 32.0
    offset: float = 10.0  # anchor distance from the canvas centre
    extent: tuple[float, float] = (8.0, 11.0)  # small, large (bounding-box side)
    jitter: float = 0.5  # per-shape uniform jitter (each axis)
    max_shift: float = 1.5  # whole-layout shift, clipped to stay inside the canvas
    min_gap: float = 1.0  # guaranteed background gap between shapes

    def anchor(self, position: str) -> tuple[float, float]:
        dx, dy = {
            "top": (0.0, -1.0),
            "left": (-1.0, 0.0),
            "centre": (0.0, 0.0),
            "right": (1.0, 0.0),
            "bottom": (0.0, 1.0),
        }[position]
        return dx * self.offset, dy * self.offset

    def size_extent(self, size: str) -> float:
        return self.extent[SIZES.index(size)]

    @property
    def size_threshold(self) -> float:
        """Bounding-box side separating small from large."""
        return sum(self.extent) / 2

    def fits(self, a: Shape, b: Shape) -> bool:
        """Whether two shapes in distinct slots keep a gap even after jitter."""
        (ax, ay), (bx, by) = self.anchor(a.position), self.anchor(b.position)
        half = (self.size_extent(a.size) + self.size_extent(b.size)) / 2 + 2 * self.jitter
        return max(abs(ax - bx) - half, abs(ay - by) - half) >= self.min_gap


GEOMETRY = Geometry()
# Every single shape fits inside the canvas before the (clipped) layout shift.
assert GEOMETRY.offset + GEOMETRY.extent[1] / 2 + GEOMETRY.jitter <= GEOMETRY.canvas / 2


class LayoutError(ValueError):
    """A scene whose shapes would overlap or that breaks the world's rules."""


@dataclass(frozen=True, order=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        if self.kind not in KIND_INDEX:
            raise ValueError(f"unknown shape kind {self.kind!r}; expected one of {KINDS}")
        if self.colour not in COLOUR_INDEX:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if self.position not in POSITION_INDEX:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS}")


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-3 shapes in distinct, non-overlapping slots.

    Shapes are stored in canonical position order, so equal specs compare equal.
    """

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        shapes = tuple(sorted(self.shapes, key=lambda s: POSITION_INDEX[s.position]))
        object.__setattr__(self, "shapes", shapes)
        if self.background not in COLOUR_INDEX:
            raise ValueError(f"unknown background colour {self.background!r}")
        if not 1 <= len(shapes) <= MAX_SHAPES:
            raise LayoutError(f"a scene has 1 to {MAX_SHAPES} shapes, got {len(shapes)}")
        positions = [s.position for s in shapes]
        if len(set(positions)) != len(positions):
            raise LayoutError(f"two shapes share a position: {positions}")
        for s in shapes:
            if s.colour == self.background:
                raise LayoutError(f"a {s.colour} {s.kind} would be invisible on a {self.background} background")
        for i, a in enumerate(shapes):
            for b in shapes[i + 1 :]:
                if not GEOMETRY.fits(a, b):
                    raise LayoutError(
                        f"a {a.size} shape {POSITION_PHRASE[a.position]} and a {b.size} shape "
                        f"{POSITION_PHRASE[b.position]} would overlap"
                    )

    def shape_at(self, position: str) -> Shape | None:
        return next((s for s in self.shapes if s.position == position), None)

    def has_heldout_pair(self) -> bool:
        return any((s.colour, s.kind) in HELDOUT_PAIRS for s in self.shapes)


def is_valid(background: str, shapes: tuple[Shape, ...] | list[Shape]) -> bool:
    """Whether these shapes make a legal scene (for sampling and edits, without try/except)."""
    try:
        Scene(background, tuple(shapes))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- rendering


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator | None:
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def render_batch(
    scenes: list[Scene], size: int = 32, rng: np.random.Generator | int | None = None
) -> np.ndarray:
    """Render scenes to uint8 [N,size,size,3], vectorised over all shapes.

    Pixels are inside a shape iff their centre is (no anti-aliasing), so every pixel is
    an exact palette colour. With ``rng`` each slot gets a small jitter and the whole
    layout a clipped shift; the random draws per scene are the same whatever the scene,
    so rendering an edited scene with the same seed keeps untouched shapes in place.
    """
    rng = _as_rng(rng)
    g = GEOMETRY
    n = len(scenes)
    scale = size / g.canvas
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return images
    images[:] = PALETTE_RGB[[COLOUR_INDEX[s.background] for s in scenes]][:, None, None, :]

    scene_idx = np.array([i for i, s in enumerate(scenes) for _ in s.shapes], dtype=np.int64)
    shapes = [sh for s in scenes for sh in s.shapes]
    pos_idx = np.array([POSITION_INDEX[sh.position] for sh in shapes], dtype=np.int64)
    anchors = np.array([g.anchor(p) for p in POSITIONS])  # [5,2]
    centre = anchors[pos_idx] + g.canvas / 2  # [M,2] (x, y) in 32-units
    extent = np.array([g.size_extent(sh.size) for sh in shapes])
    if rng is not None:
        jitter = rng.uniform(-g.jitter, g.jitter, size=(n, len(POSITIONS), 2))
        shift = rng.uniform(-g.max_shift, g.max_shift, size=(n, 2))
        centre = centre + jitter[scene_idx, pos_idx]
        lo = np.full((n, 2), np.inf)
        hi = np.full((n, 2), -np.inf)
        np.minimum.at(lo, scene_idx, centre - extent[:, None] / 2)
        np.maximum.at(hi, scene_idx, centre + extent[:, None] / 2)
        shift = np.clip(shift, np.minimum(-lo, 0.0), np.maximum(g.canvas - hi, 0.0))
        centre = centre + shift[scene_idx]
    centre = centre * scale
    half = extent * scale / 2
    kinds = np.array([KIND_INDEX[sh.kind] for sh in shapes])
    colours = PALETTE_RGB[[COLOUR_INDEX[sh.colour] for sh in shapes]]

    coords = np.arange(size, dtype=np.float64) + 0.5
    chunk = 4096
    for start in range(0, len(shapes), chunk):
        sl = slice(start, start + chunk)
        dx = coords[None, None, :] - centre[sl, 0, None, None]  # [m,1,W]
        dy = coords[None, :, None] - centre[sl, 1, None, None]  # [m,H,1]
        h = half[sl, None, None]
        k = kinds[sl, None, None]
        in_rows = (dy >= -h) & (dy < h)
        square = in_rows & (dx >= -h) & (dx < h)
        circle = dx**2 + dy**2 < h**2
        triangle = in_rows & (np.abs(dx) < (dy + h) / 2)
        mask = np.where(k == 0, circle, np.where(k == 1, square, triangle))
        m, ys, xs = np.nonzero(mask)
        images[scene_idx[sl][m], ys, xs] = colours[sl][m]
    return images


def render(scene: Scene, size: int = 32, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Render one scene to uint8 [size,size,3]."""
    return render_batch([scene], size=size, rng=rng)[0]


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _objects_phrase(scene: Scene) -> str:
    shapes = scene.shapes
    first = shapes[0]
    identical = len(shapes) > 1 and all(
        (s.kind, s.colour, s.size) == (first.kind, first.colour, first.size) for s in shapes
    )
    if identical:
        places = _join([POSITION_PHRASE[s.position] for s in shapes])
        return f"{COUNT_WORDS[len(shapes)]} {first.size} {first.colour} {first.kind}s {places}"
    return _join(
        [f"{_article(s.size)} {s.size} {s.colour} {s.kind} {POSITION_PHRASE[s.position]}" for s in shapes]
    )


# (format, regex); the regex captures the objects phrase and the background colour.
_CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{objs} on {a_bg} {bg} background", r"(?P<objs>.+) on an? (?P<bg>\w+) background"),
    ("{a_bg} {bg} background with {objs}", r"an? (?P<bg>\w+) background with (?P<objs>.+)"),
    ("on {a_bg} {bg} background, {objs}", r"on an? (?P<bg>\w+) background, (?P<objs>.+)"),
    ("{objs}, {bg} background", r"(?P<objs>.+), (?P<bg>\w+) background"),
    ("a picture of {objs} on {a_bg} {bg} background", r"a picture of (?P<objs>.+) on an? (?P<bg>\w+) background"),
)
N_CAPTION_TEMPLATES = len(_CAPTION_TEMPLATES)


def caption(scene: Scene, rng: np.random.Generator | int | None = None, template: int | None = None) -> str:
    """Describe a scene; ``rng`` picks a paraphrase template (template 0 without it)."""
    rng = _as_rng(rng)
    if template is None:
        template = 0 if rng is None else int(rng.integers(N_CAPTION_TEMPLATES))
    fmt = _CAPTION_TEMPLATES[template][0]
    return fmt.format(objs=_objects_phrase(scene), bg=scene.background, a_bg=_article(scene.background))


def _normalise(text: str) -> str:
    text = text.strip().lower().rstrip(".!").strip()
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,\s*", ", ", text)
    return text.replace("center", "centre").replace("color", "colour")


_WORD = r"[a-z]+"
_POS_RE = "|".join(re.escape(p) for p in PHRASE_POSITION)
_OBJ_RE = re.compile(rf"an? (?P<size>{_WORD}) (?P<colour>{_WORD}) (?P<kind>{_WORD}) (?P<pos>{_POS_RE})")
_GROUP_RE = re.compile(rf"(?P<count>{_WORD}) (?P<size>{_WORD}) (?P<colour>{_WORD}) (?P<kind>{_WORD})s (?P<places>.+)")
_SPLIT_RE = re.compile(r", and |, | and ")


def _check_word(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; the Shapes world knows {', '.join(allowed)}")
    return value


def _parse_objects(text: str) -> list[Shape]:
    group = _GROUP_RE.fullmatch(text)
    if group and group["count"] in WORD_COUNTS:
        places = _SPLIT_RE.split(group["places"])
        count = WORD_COUNTS[group["count"]]
        if len(places) != count:
            raise ValueError(f"{group['count']!r} shapes but {len(places)} positions in {text!r}")
        unknown = [p for p in places if p not in PHRASE_POSITION]
        if unknown:
            raise ValueError(f"unknown position phrase {unknown[0]!r}; expected one of {list(PHRASE_POSITION)}")
        return [
            Shape(
                kind=_check_word(group["kind"], KINDS, "shape"),
                colour=_check_word(group["colour"], COLOURS, "colour"),
                size=_check_word(group["size"], SIZES, "size"),
                position=PHRASE_POSITION[p],
            )
            for p in places
        ]
    shapes = []
    for part in _SPLIT_RE.split(text):
        m = _OBJ_RE.fullmatch(part)
        if not m:
            raise ValueError(
                f"cannot read {part!r} as a shape; expected e.g. 'a small red circle on the left'"
            )
        shapes.append(
            Shape(
                kind=_check_word(m["kind"], KINDS, "shape"),
                colour=_check_word(m["colour"], COLOURS, "colour"),
                size=_check_word(m["size"], SIZES, "size"),
                position=PHRASE_POSITION[m["pos"]],
            )
        )
    return shapes


def parse_caption(text: str) -> Scene:
    """Exact inverse of :func:`caption`; ValueError (with the reason) outside the grammar."""
    norm = _normalise(text)
    errors: list[str] = []
    for _, pattern in reversed(_CAPTION_TEMPLATES):  # most specific wrappers first
        m = re.fullmatch(pattern, norm)
        if not m:
            continue
        try:
            background = _check_word(m["bg"], COLOURS, "background colour")
            return Scene(background, tuple(_parse_objects(m["objs"])))
        except ValueError as err:
            errors.append(str(err))
    if not errors:
        raise ValueError(f"caption {text!r} does not end in / start with '... on a <colour> background'")
    raise ValueError(f"caption {text!r} is outside the Shapes grammar: {errors[0]}")


# --------------------------------------------------------------------------- sampling

Split = Literal["train", "heldout", "any"]


def _random_shape(rng: np.random.Generator, background: str, position: str, size: str) -> Shape:
    colours = [c for c in COLOURS if c != background]
    return Shape(
        kind=KINDS[int(rng.integers(len(KINDS)))],
        colour=colours[int(rng.integers(len(colours)))],
        size=size,
        position=position,
    )


def _in_split(scene: Scene, split: Split) -> bool:
    if split == "any":
        return True
    if split == "train":
        return not scene.has_heldout_pair()
    if split == "heldout":
        return scene.has_heldout_pair()
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'any'")


def sample_scene(
    rng: np.random.Generator | int,
    split: Split = "any",
    n_shapes: int | None = None,
    p_identical: float = 0.15,
    count_probs: tuple[float, float, float] = (0.4, 0.35, 0.25),
) -> Scene:
    """A random valid scene; ``split`` excludes ("train") or requires ("heldout") a held-out pair.

    ``p_identical`` makes multi-shape scenes repeat one shape so the counting phrasing
    ("two small red circles ...") is common enough to learn.
    """
    rng = _as_rng(rng)
    assert rng is not None
    for _ in range(10_000):
        n = n_shapes if n_shapes is not None else int(rng.choice(3, p=count_probs)) + 1
        background = COLOURS[int(rng.integers(len(COLOURS)))]
        positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:n]]
        # three shapes only fit when small, so don't waste draws on large ones
        sizes = ["small"] * n if n == 3 else [SIZES[int(rng.integers(2))] for _ in range(n)]
        if n > 1 and rng.random() < p_identical:
            first = _random_shape(rng, background, positions[0], sizes[0])
            shapes = [replace(first, position=p) for p in positions]
        else:
            shapes = [_random_shape(rng, background, p, s) for p, s in zip(positions, sizes)]
        if not is_valid(background, shapes):
            continue
        scene = Scene(background, tuple(shapes))
        if _in_split(scene, split):
            return scene
    raise RuntimeError("could not sample a valid scene")  # pragma: no cover


PROMPT_SET_SIZES = {"train": 2000, "heldout": 300}
_PROMPT_SET_SEEDS = {"train": 20_240_601, "heldout": 20_240_602}


@functools.lru_cache(maxsize=None)
def _prompt_set(name: str) -> tuple[str, ...]:
    if name not in PROMPT_SET_SIZES:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {sorted(PROMPT_SET_SIZES)}")
    rng = np.random.default_rng(_PROMPT_SET_SEEDS[name])
    seen: set[Scene] = set()
    prompts: list[str] = []
    while len(prompts) < PROMPT_SET_SIZES[name]:
        scene = sample_scene(rng, split=name)  # type: ignore[arg-type]
        if scene in seen:
            continue
        seen.add(scene)
        prompts.append(caption(scene, rng))
    return tuple(prompts)


def prompt_set(name: str) -> list[str]:
    """Deterministic prompt lists: "train" (2000) and "heldout" (300).

    Held-out prompts each contain a colour/kind pair from :data:`HELDOUT_PAIRS` that no
    train scene contains, so the two sets are disjoint by construction.
    """
    return list(_prompt_set(name))


def make_dataset(
    n: int, seed: int, size: int = 32, split: Split = "train", jitter: bool = True
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random (image uint8 [n,size,size,3], caption, scene) triples from one seed."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split=split) for _ in range(n)]
    captions = [caption(s, rng) for s in scenes]
    images = render_batch(scenes, size=size, rng=rng if jitter else None)
    return images, captions, scenes


# --------------------------------------------------------------------------- edits


def _reference(shape: Shape, scene: Scene) -> str:
    """Shortest unambiguous way to name ``shape`` in ``scene``."""
    if sum(s.kind == shape.kind for s in scene.shapes) == 1:
        return shape.kind
    if sum((s.kind, s.colour) == (shape.kind, shape.colour) for s in scene.shapes) == 1:
        return f"{shape.colour} {shape.kind}"
    return f"{shape.kind} {POSITION_PHRASE[shape.position]}"


_COLOUR_RE = "|".join(COLOURS)
_REF_RE = rf"(?:(?P<colour>{_WORD}) )?(?:(?P<size>small|large) )?(?P<kind>{_WORD})(?: (?P<pos>{_POS_RE}))?"
_TO_POS = {p: ("to the centre" if p == "centre" else f"to the {p}") for p in POSITIONS}
_TO_POS_RE = "|".join(re.escape(v) for v in _TO_POS.values())

# (operation, format, regex) -- formats use {ref}, {colour}, {pos}, {to_pos}, {obj}, {dir}
_EDIT_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("recolour", "make the {ref} {colour}", rf"make the {_REF_RE} (?P<new_colour>{_COLOUR_RE})"),
    ("recolour", "turn the {ref} {colour}", rf"turn the {_REF_RE} (?P<new_colour>{_COLOUR_RE})"),
    ("recolour", "change the colour of the {ref} to {colour}", rf"change the colour of the {_REF_RE} to (?P<new_colour>{_COLOUR_RE})"),
    ("resize", "make the {ref} {dir}", rf"make the {_REF_RE} (?P<dir>larger|bigger|smaller)"),
    ("move", "move the {ref} {to_pos}", rf"move the {_REF_RE} (?P<to_pos>{_TO_POS_RE})"),
    ("move", "shift the {ref} {to_pos}", rf"shift the {_REF_RE} (?P<to_pos>{_TO_POS_RE})"),
    ("remove", "remove the {ref}", rf"remove the {_REF_RE}"),
    ("remove", "delete the {ref}", rf"delete the {_REF_RE}"),
    ("add", "add {obj}", rf"add (?P<obj>an? {_WORD} {_WORD} {_WORD} (?:{_POS_RE}))"),
    ("add", "draw {obj}", rf"draw (?P<obj>an? {_WORD} {_WORD} {_WORD} (?:{_POS_RE}))"),
)
N_EDIT_TEMPLATES = len(_EDIT_TEMPLATES)
EDIT_OPERATIONS: tuple[str, ...] = ("recolour", "resize", "move", "remove", "add")


def _edit_candidates(scene: Scene) -> dict[str, list[tuple[dict[str, str], Scene]]]:
    """Every valid single edit of ``scene``: op -> [(template fields, target scene)]."""
    out: dict[str, list[tuple[dict[str, str], Scene]]] = {op: [] for op in EDIT_OPERATIONS}
    shapes = list(scene.shapes)

    def target(new_shapes: list[Shape]) -> Scene | None:
        return Scene(scene.background, tuple(new_shapes)) if is_valid(scene.background, new_shapes) else None

    for i, s in enumerate(shapes):
        ref = _reference(s, scene)
        others = shapes[:i] + shapes[i + 1 :]
        for colour in COLOURS:
            if colour != s.colour and (t := target(others + [replace(s, colour=colour)])):
                out["recolour"].append(({"ref": ref, "colour": colour}, t))
        new_size = "large" if s.size == "small" else "small"
        if t := target(others + [replace(s, size=new_size)]):
            out["resize"].append(({"ref": ref, "dir": "larger" if new_size == "large" else "smaller"}, t))
        for p in POSITIONS:
            if p != s.position and (t := target(others + [replace(s, position=p)])):
                out["move"].append(({"ref": ref, "to_pos": _TO_POS[p]}, t))
        if others:
            out["remove"].append(({"ref": ref}, Scene(scene.background, tuple(others))))
    if len(shapes) < MAX_SHAPES:
        for p in POSITIONS:
            for size in SIZES:
                for colour in COLOURS:
                    for kind in KINDS:
                        new = Shape(kind, colour, size, p)
                        if t := target(shapes + [new]):
                            obj = f"{_article(size)} {size} {colour} {kind} {POSITION_PHRASE[p]}"
                            out["add"].append(({"obj": obj}, t))
    return out


def sample_edit(scene: Scene, rng: np.random.Generator | int, op: str | None = None) -> tuple[str, Scene]:
    """A random edit instruction for ``scene`` and the scene it should produce.

    The operation is drawn uniformly among those possible (removal needs two shapes,
    addition a free slot), so rare-but-valid edits are not drowned out.
    """
    rng = _as_rng(rng)
    assert rng is not None
    candidates = {k: v for k, v in _edit_candidates(scene).items() if v}
    if op is not None:
        if op not in candidates:
            raise ValueError(f"edit {op!r} is not possible for this scene")
        ops = [op]
    else:
        ops = sorted(candidates, key=EDIT_OPERATIONS.index)
    op = ops[int(rng.integers(len(ops)))]
    fields, target_scene = candidates[op][int(rng.integers(len(candidates[op])))]
    templates = [t for t in _EDIT_TEMPLATES if t[0] == op]
    fmt = templates[int(rng.integers(len(templates)))][1]
    return fmt.format(**fields), target_scene


def _resolve(m: re.Match[str], scene: Scene) -> Shape:
    kind = _check_word(m["kind"], KINDS, "shape")
    colour = m["colour"] and _check_word(m["colour"], COLOURS, "colour")
    pos = m["pos"] and PHRASE_POSITION[m["pos"]]
    hits = [
        s
        for s in scene.shapes
        if s.kind == kind
        and (not colour or s.colour == colour)
        and (not m["size"] or s.size == m["size"])
        and (not pos or s.position == pos)
    ]
    words = " ".join(w for w in (m["colour"], m["size"], kind, m["pos"]) if w)
    if not hits:
        raise ValueError(f"there is no {words} in the scene")
    if len(hits) > 1:
        raise ValueError(f"'the {words}' is ambiguous: the scene has {len(hits)} of them")
    return hits[0]


def parse_instruction(instruction: str, source: Scene | str) -> Scene:
    """The scene an edit instruction should produce from ``source`` (a Scene or caption).

    Raises ValueError when the instruction is outside the grammar, names no single
    shape, or would produce an invalid scene (overlap, invisible colour, >3 shapes).
    """
    scene = parse_caption(source) if isinstance(source, str) else source
    norm = _normalise(instruction)
    for op, _, pattern in _EDIT_TEMPLATES:
        m = re.fullmatch(pattern, norm)
        if not m:
            continue
        if op == "add":
            (new,) = _parse_objects(m["obj"])
            return Scene(scene.background, scene.shapes + (new,))
        shape = _resolve(m, scene)
        others = tuple(s for s in scene.shapes if s is not shape)
        if op == "recolour":
            new_colour = _check_word(m["new_colour"], COLOURS, "colour")
            if new_colour == shape.colour:
                raise ValueError(f"the {shape.kind} is already {new_colour}")
            return Scene(scene.background, others + (replace(shape, colour=new_colour),))
        if op == "resize":
            new_size = "small" if m["dir"] == "smaller" else "large"
            if new_size == shape.size:
                raise ValueError(f"the {shape.kind} is already {new_size}")
            return Scene(scene.background, others + (replace(shape, size=new_size),))
        if op == "move":
            new_pos = next(p for p, v in _TO_POS.items() if v == m["to_pos"])
            if new_pos == shape.position:
                raise ValueError(f"the {shape.kind} is already {POSITION_PHRASE[new_pos]}")
            return Scene(scene.background, others + (replace(shape, position=new_pos),))
        if op == "remove":
            if not others:
                raise LayoutError("cannot remove the only shape: a scene needs at least one")
            return Scene(scene.background, others)
    raise ValueError(
        f"instruction {instruction!r} is outside the edit grammar; expected e.g. 'make the circle green', "
        "'make the square larger', 'move the square to the left', 'remove the triangle', "
        "'add a small yellow circle at the top'"
    )
