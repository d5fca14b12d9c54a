"""The Shapes oracle: an exact, programmatic judge that plays the human.

It never learns anything, so it cannot be hacked the way a learned reward can: if a
learned reward rises while the oracle's ``overall`` does not, the generator is gaming the
reward. It reads the caption's scene spec and measures the pixels:

1. every pixel is snapped to its nearest palette colour; pixels farther than
   ``SEGMENT_THRESHOLD`` from all palette colours are "impure" and belong to nothing;
2. the background is the most common colour on the border;
3. each non-background colour is split into 8-connected components; components smaller
   than ``min_area`` are specks (they only lower ``quality``);
4. each component gets a kind (best IoU against a circle, square and triangle fitted to
   its bounding box), a size (bounding-box side) and a position (bounding-box centre --
   a triangle's centre of mass sits low, its box centre does not);
5. requested shapes are matched to found ones with the Hungarian algorithm, so
   multi-object captions are judged object by object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .world import (
    COLOURS,
    GEOMETRY,
    KINDS,
    PALETTE_RGB,
    Scene,
    Shape,
    parse_caption,
    parse_instruction,
)

__all__ = [
    "FoundShape",
    "ImageAnalysis",
    "Judgement",
    "analyse",
    "judge",
    "judge_scenes",
    "judge_edit",
    "match_shapes",
    "summarize",
    "to_uint8_images",
    "ATTRIBUTES",
]

ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "count", "size", "position")
SEGMENT_THRESHOLD = 50.0  # < half the smallest palette distance (~106): snapping is unambiguous
PURITY_SCALE = 64.0  # a pixel this far from every palette colour counts as fully impure
MIN_AREA_32 = 8  # components below this many pixels (on a 32-px canvas) are specks
SPECK_BUDGET = 0.05  # speck pixels covering this fraction of the image zero the speck term
MIN_SHAPE_IOU = 0.6  # below this a blob is no recognisable kind
EDIT_MOVE_TOLERANCE = 2.5  # (32-px units) an untouched shape may drift this far and count as kept


@dataclass(frozen=True)
class FoundShape:
    """One connected component as the oracle sees it."""

    colour: str
    kind: str  # one of KINDS, or "unknown"
    size: str
    position: str
    centre: tuple[float, float]  # bbox centre (x, y) in 32-px canvas units, whatever the image size
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends)
    area: int
    kind_iou: float


@dataclass(frozen=True)
class ImageAnalysis:
    background: str | None
    shapes: tuple[FoundShape, ...]
    purity: float  # mean closeness of pixels to the palette, 1 for a clean render
    speck_pixels: int
    n_specks: int
    quality: float


@dataclass(frozen=True)
class Judgement:
    """How well one image matches one scene spec; every score is in [0, 1].

    Per-object attributes (colour, shape, size, position) are the fraction of requested
    objects whose matched component has that attribute right (unmatched objects count
    as wrong). ``count`` is min(found, requested) / max(found, requested).
    ``overall`` = (requested objects fully right / max(requested, found)) x background,
    so it is 1 only for an exact image, drops with every wrong or extra object, and is
    near 0 for an unrelated caption. ``quality`` is judged separately from the caption.
    For edits, ``edit_applied`` and ``preserved`` are set and also multiply ``overall``.
    """

    background: float
    colour: float
    shape: float
    count: float
    size: float
    position: float
    overall: float
    exact: bool
    quality: float
    found: tuple[FoundShape, ...] = ()
    matches: tuple[tuple[int, int], ...] = ()  # (requested index, found index)
    edit_applied: float | None = None
    preserved: float | None = None

    @property
    def attribute_mean(self) -> float:
        """A softer score than ``overall``: plain mean of the six attributes."""
        return float(np.mean([getattr(self, a) for a in ATTRIBUTES]))


# --------------------------------------------------------------------------- inputs


def to_uint8_images(images: Any) -> np.ndarray:
    """Accept uint8/float numpy [B,H,W,3] or [H,W,3], or a torch tensor [B,3,H,W] in [0,1]."""
    if hasattr(images, "detach"):  # torch tensor without importing torch
        t = images.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.shape[1] == 3 and t.shape[-1] != 3:
            t = t.permute(0, 2, 3, 1)
        images = t.numpy()
    elif isinstance(images, (list, tuple)):
        images = np.stack([to_uint8_images(im)[0] for im in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected images [B,H,W,3] (or torch [B,3,H,W]), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float64)
        if arr.max(initial=0.0) <= 1.0 + 1e-6:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return arr


# --------------------------------------------------------------------------- analysis


_TEMPLATE_CACHE: dict[tuple[int, int], np.ndarray] = {}
_FIT_OFFSETS = (-0.5, -0.25, 0.0, 0.25, 0.5)  # template centre relative to the box centre
_FIT_GROWTH = (0.0, 0.5, 1.0)  # template extent beyond the box (rasterising shrinks boxes)


def _templates(h: int, w: int) -> np.ndarray:
    """Masks [3, F, h+2, w+2] of circles/squares/triangles fitted to an h x w box.

    Each kind is a small family over sub-pixel centre offsets and extents, drawn with
    the renderer's raster rule, so a clean render of a kind always has a near-perfect
    member while a different kind does not. The 1-pixel margin lets a template that
    spills outside the box count against it.
    """
    key = (h, w)
    if key not in _TEMPLATE_CACHE:
        x = np.arange(w + 2) - 1 + 0.5  # pixel centres, box spans [0, w]
        y = np.arange(h + 2) - 1 + 0.5
        offsets = np.array(_FIT_OFFSETS)
        growth = np.array(_FIT_GROWTH)
        # family axes: (offset x, offset y, growth x, growth y)
        cx = w / 2 + offsets[:, None, None, None]
        cy = h / 2 + offsets[None, :, None, None]
        hx = (w + growth[None, None, :, None]) / 2
        hy = (h + growth[None, None, None, :]) / 2
        fam = (len(offsets), len(offsets), len(growth), len(growth))
        cx, cy, hx, hy = (np.broadcast_to(a, fam).reshape(-1, 1, 1) for a in (cx, cy, hx, hy))
        dx = x[None, None, :] - cx
        dy = y[None, :, None] - cy
        in_rows = (dy >= -hy) & (dy < hy)
        circle = (dx / hx) ** 2 + (dy / hy) ** 2 < 1
        square = in_rows & (dx >= -hx) & (dx < hx)
        triangle = in_rows & (np.abs(dx) < hx * (dy + hy) / (2 * hy))
        _TEMPLATE_CACHE[key] = np.stack([circle, square, triangle])
    return _TEMPLATE_CACHE[key]


def _classify_kind(mask: np.ndarray, scale: float = 1.0) -> tuple[str, float]:
    """Best kind for a component mask cropped to its box, and that kind's best IoU.

    At 8 pixels a square with nibbled corners *is* a rasterised circle, so corners
    decide first: if all four corner blocks (2x2 on a 32-px canvas) are at least 3/4
    filled it is a square with slightly rounded corners (rendered circles fill at most
    half of some corner block, triangles leave the top corners empty).
    """
    padded = np.pad(mask, 1)
    tmpl = _templates(*mask.shape)
    inter = (tmpl & padded).sum(axis=(2, 3))
    union = (tmpl | padded).sum(axis=(2, 3))
    iou = (inter / np.maximum(union, 1)).max(axis=1)
    b = max(2, int(round(2 * scale)))
    if min(mask.shape) >= 2 * b:
        corner_fill = min(mask[:b, :b].mean(), mask[:b, -b:].mean(), mask[-b:, :b].mean(), mask[-b:, -b:].mean())
        if corner_fill >= 0.75:
            iou[0] = min(iou[0], iou[1] - 1e-6)  # square beats circle
    best = int(np.argmax(iou))
    if iou[best] < MIN_SHAPE_IOU:
        return "unknown", float(iou[best])
    return KINDS[best], float(iou[best])


def _classify_position(cx: float, cy: float) -> str:
    """Nearest slot by the rule a viewer would use: central box, else the dominant axis."""
    dx, dy = cx - GEOMETRY.canvas / 2, cy - GEOMETRY.canvas / 2
    if max(abs(dx), abs(dy)) < GEOMETRY.offset / 2:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


_EIGHT = np.ones((3, 3), dtype=bool)


def _analyse_one(labels: np.ndarray, dist: np.ndarray) -> ImageAnalysis:
    h, w = labels.shape
    scale = h / GEOMETRY.canvas
    min_area = max(1, int(round(MIN_AREA_32 * scale * scale)))
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    border = border[border >= 0]
    background = None
    if border.size:
        bg_idx = int(np.bincount(border, minlength=len(COLOURS)).argmax())
        background = COLOURS[bg_idx]
    else:
        bg_idx = -1

    found: list[FoundShape] = []
    speck_pixels = 0
    n_specks = 0
    for colour_idx in np.unique(labels):
        if colour_idx < 0 or colour_idx == bg_idx:
            continue
        comp, n = ndimage.label(labels == colour_idx, structure=_EIGHT)
        areas = np.bincount(comp.ravel())
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            area = int(areas[i])
            if area < min_area:
                speck_pixels += area
                n_specks += 1
                continue
            ys, xs = sl
            kind, iou = _classify_kind(comp[sl] == i, scale)
            cx, cy = (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2
            side = max(xs.stop - xs.start, ys.stop - ys.start) / scale
            found.append(
                FoundShape(
                    colour=COLOURS[int(colour_idx)],
                    kind=kind,
                    size="large" if side >= GEOMETRY.size_threshold else "small",
                    position=_classify_position(cx / scale, cy / scale),
                    centre=(cx / scale, cy / scale),
                    bbox=(xs.start, ys.start, xs.stop, ys.stop),
                    area=area,
                    kind_iou=iou,
                )
            )
    purity = float(np.clip(1.0 - dist / PURITY_SCALE, 0.0, 1.0).mean())
    speck_term = max(0.0, 1.0 - speck_pixels / (SPECK_BUDGET * h * w))
    return ImageAnalysis(
        background=background,
        shapes=tuple(found),
        purity=purity,
        speck_pixels=speck_pixels,
        n_specks=n_specks,
        quality=purity * speck_term,
    )


def analyse(images: Any) -> list[ImageAnalysis]:
    """Segment and describe every image (no caption needed)."""
    arr = to_uint8_images(images)
    palette = PALETTE_RGB.astype(np.float32)
    out: list[ImageAnalysis] = []
    chunk = 256
    for start in range(0, len(arr), chunk):
        x = arr[start : start + chunk].astype(np.float32)
        d2 = ((x[..., None, :] - palette) ** 2).sum(-1)  # [b,H,W,P]
        nearest = d2.argmin(-1)
        dist = np.sqrt(np.take_along_axis(d2, nearest[..., None], -1)[..., 0])
        labels = np.where(dist <= SEGMENT_THRESHOLD, nearest, -1)
        out.extend(_analyse_one(labels[i], dist[i]) for i in range(len(x)))
    return out


# --------------------------------------------------------------------------- judging


def _agreement(req: Shape, got: FoundShape) -> np.ndarray:
    return np.array(
        [req.colour == got.colour, req.kind == got.kind, req.size == got.size, req.position == got.position],
        dtype=float,
    )


def match_shapes(requested: Sequence[Shape], found: Sequence[FoundShape]) -> list[tuple[int, int]]:
    """Pair requested and found shapes (Hungarian), returning (requested, found) indices.

    Maximises fully right objects first, then agreeing attributes, so a wrong object is
    judged against the found shape it most resembles. Ties are broken towards the found shape nearest the requested slot, so e.g. two
    identical circles are matched to the right sides.
    """
    if not requested or not found:
        return []
    score = np.zeros((len(requested), len(found)))
    for i, req in enumerate(requested):
        ax, ay = GEOMETRY.anchor(req.position)
        ax, ay = ax + GEOMETRY.canvas / 2, ay + GEOMETRY.canvas / 2
        for j, got in enumerate(found):
            distance = np.hypot(got.centre[0] - ax, got.centre[1] - ay) / GEOMETRY.canvas
            agree = _agreement(req, got)
            score[i, j] = 10 * agree.all() + agree.sum() - 1e-2 * distance
    rows, cols = linear_sum_assignment(-score)
    return [(int(r), int(c)) for r, c in zip(rows, cols)]


def _judge_analysis(analysis: ImageAnalysis, scene: Scene) -> Judgement:
    requested = scene.shapes
    found = analysis.shapes
    pairs = match_shapes(requested, found)
    per_attr = np.zeros(4)
    fully_right = 0
    for r, f in pairs:
        agree = _agreement(requested[r], found[f])
        per_attr += agree
        fully_right += int(agree.all())
    n_req, n_found = len(requested), len(found)
    per_attr /= n_req
    background = float(analysis.background == scene.background)
    count = min(n_req, n_found) / max(n_req, n_found) if max(n_req, n_found) else 1.0
    overall = fully_right / max(n_req, n_found) * background
    return Judgement(
        background=background,
        colour=float(per_attr[0]),
        shape=float(per_attr[1]),
        count=float(count),
        size=float(per_attr[2]),
        position=float(per_attr[3]),
        overall=float(overall),
        exact=bool(overall == 1.0),
        quality=analysis.quality,
        found=found,
        matches=tuple(pairs),
    )


def judge_scenes(images: Any, scenes: Sequence[Scene]) -> list[Judgement]:
    """Judge images against scene specs directly (no caption parsing)."""
    analyses = analyse(images)
    if len(analyses) != len(scenes):
        raise ValueError(f"{len(analyses)} images but {len(scenes)} scenes")
    return [_judge_analysis(a, s) for a, s in zip(analyses, scenes)]


def judge(images: Any, captions: str | Sequence[str]) -> list[Judgement]:
    """Judge images against captions; raises ValueError for captions outside the grammar."""
    if isinstance(captions, str):
        captions = [captions]
    return judge_scenes(images, [parse_caption(c) for c in captions])


def judge_edit(
    source_image: Any,
    instruction: str,
    edited_image: Any,
    source: Scene | str,
) -> Judgement:
    """Judge an edit: the edited image against the scene the instruction asks for.

    ``edit_applied``: fraction of changed objects that are now right (for a removal:
    the removed object is gone). ``preserved``: fraction of untouched objects that are
    still fully right and have not drifted more than ``EDIT_MOVE_TOLERANCE`` from where
    they were in the source image. Both multiply ``overall``, so returning the source
    image unchanged scores 0.
    """
    source_scene = parse_caption(source) if isinstance(source, str) else source
    target = parse_instruction(instruction, source_scene)
    src_analysis, edit_analysis = analyse(np.concatenate([to_uint8_images(source_image), to_uint8_images(edited_image)]))
    judgement = _judge_analysis(edit_analysis, target)
    src_judgement = _judge_analysis(src_analysis, source_scene)
    def right_in(j: Judgement, scene: Scene, shape: Shape) -> FoundShape | None:
        r = scene.shapes.index(shape)
        for rr, f in j.matches:
            if rr == r and _agreement(shape, j.found[f]).all():
                return j.found[f]
        return None

    changed = [s for s in target.shapes if s not in source_scene.shapes]
    # a recoloured/moved/resized shape is "changed", not removed: only a shrinking
    # scene has removed shapes whose absence must be checked
    removed = (
        [s for s in source_scene.shapes if s not in target.shapes]
        if len(target.shapes) < len(source_scene.shapes)
        else []
    )
    kept = [s for s in target.shapes if s in source_scene.shapes]

    successes = [right_in(judgement, target, s) is not None for s in changed]
    for s in removed:
        still_there = any(
            (f.colour, f.kind, f.position) == (s.colour, s.kind, s.position) for f in edit_analysis.shapes
        )
        successes.append(not still_there)
    edit_applied = float(np.mean(successes)) if successes else 1.0

    kept_ok = []
    for s in kept:
        now = right_in(judgement, target, s)
        before = right_in(src_judgement, source_scene, s)
        ok = now is not None
        if ok and before is not None:
            drift = np.hypot(now.centre[0] - before.centre[0], now.centre[1] - before.centre[1])
            ok = drift <= EDIT_MOVE_TOLERANCE
        kept_ok.append(ok)
    preserved = float(np.mean(kept_ok)) if kept_ok else 1.0

    overall = judgement.overall * edit_applied * preserved
    return Judgement(
        background=judgement.background,
        colour=judgement.colour,
        shape=judgement.shape,
        count=judgement.count,
        size=judgement.size,
        position=judgement.position,
        overall=float(overall),
        exact=bool(judgement.exact and edit_applied == 1.0 and preserved == 1.0),
        quality=judgement.quality,
        found=judgement.found,
        matches=judgement.matches,
        edit_applied=edit_applied,
        preserved=preserved,
    )


def summarize(judgements: Iterable[Judgement]) -> dict[str, float]:
    """Mean overall, exact-match rate, per-attribute accuracy and mean quality."""
    js = list(judgements)
    if not js:
        return {"n": 0}
    out: dict[str, float] = {
        "n": len(js),
        "overall": float(np.mean([j.overall for j in js])),
        "exact_rate": float(np.mean([j.exact for j in js])),
        "quality": float(np.mean([j.quality for j in js])),
    }
    for a in ATTRIBUTES:
        out[f"acc_{a}"] = float(np.mean([getattr(j, a) for j in js]))
    edits = [j for j in js if j.edit_applied is not None]
    if edits:
        out["edit_applied"] = float(np.mean([j.edit_applied for j in edits]))
        out["preserved"] = float(np.mean([j.preserved for j in edits]))
    return out
