"""The shapes benchmark's judge: a VQA "model" that answers ``questions.py``'s questions from pixels.

Why an oracle instead of a learned VQA model: in this world the judge can be exact, so a score
measures the generator alone. It works like a careful person would: take the background colour
from the image border, cut the rest into connected blobs, and for each blob read its colour
(nearest palette colour of its most saturated pixels), its soft coverage (each pixel's position
between background and blob colour — this undoes antialiasing), its shape and its size. Shape is
*analysis by synthesis*: for each candidate, the outline of ``world.outline`` with the blob's area
and centroid is drawn and compared with the coverage; the closest wins, and a blob no outline
fits (residual > ``max_residual``) has no shape — a smudge is not a circle. Size is the fitted
extent relative to a grid cell, position the fitted centre's cell.

Answers follow the questions' wording: "Is the circle red?" holds if every circle is red; "Is
there a triangle in the top left …?" if any is; counts are exact.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import EllaError
from .world import BACKGROUNDS, COLOURS, PLURALS, SHAPES, SIZE_FRACTION, cell_name, outline

CELLS = {cell_name(r, c): (r, c) for r in range(3) for c in range(3)}
SINGULAR = {p: s for s, p in PLURALS.items()}
_S, _P = "|".join(SHAPES), "|".join(PLURALS.values())
_C, _B, _CELL = "|".join(COLOURS), "|".join(BACKGROUNDS), "|".join(CELLS)
PATTERNS = [  # (kind, regex over the lowercased question) — exactly the wordings of questions.py
    ("entity", rf"is there an? (?P<a>{_S})"),
    ("colour", rf"(?:is the (?P<a>{_S})|are the (?P<ap>{_P})) (?P<v>{_C})"),
    ("size", rf"(?:is the (?P<a>{_S})|are the (?P<ap>{_P})) (?P<v>small|large)"),
    ("count", rf"are there (?P<v>two|three) (?P<ap>{_P})"),
    ("position", rf"is (?:the|there a) (?P<a>{_S}) in the (?P<v>{_CELL}) of the image"),
    ("relation", rf"is the (?P<a>{_S}) (?P<v>left of|right of|above|below) the (?P<b>{_S})"),
    ("background", rf"is the background (?P<v>{_B})"),
]
PATTERNS = [(kind, re.compile(rf"{p}\?")) for kind, p in PATTERNS]
NUMBER = {"two": 2, "three": 3}
#: Gaussian blurs (in pixels of a 64x64 image) tried on each outline; the best fit wins.
BLURS = (0.0, 0.7, 1.4)


def _polygon_area_centroid(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Shoelace area and centroid of a simple polygon."""
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        cross = x0 * y1 - x1 * y0
        a, cx, cy = a + cross, cx + (x0 + x1) * cross, cy + (y0 + y1) * cross
    return abs(a) / 2, cx / (3 * a), cy / (3 * a)


#: Per shape, for extent 1 centred at 0: (area, centroid x, centroid y) — what the fit inverts.
GEOMETRY = {s: _polygon_area_centroid(outline(s, 0.0, 0.0, 1.0)) for s in SHAPES}
#: Extent / cell above this is "large": the geometric mean of the two rendered fractions.
LARGE_THRESHOLD = float(np.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]))


@dataclass(frozen=True)
class Blob:
    """One object as the oracle sees it; ``shape``/``colour`` are None when nothing fits well."""

    shape: str | None
    colour: str | None
    size: str
    row: int
    col: int
    residual: float  # mean absolute coverage error of the best outline, relative to the blob's area


@dataclass(frozen=True)
class Analysis:
    background: str | None
    blobs: tuple[Blob, ...]

    def of(self, shape: str) -> list[Blob]:
        return [b for b in self.blobs if b.shape == shape]


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], tolerance: float) -> str | None:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(d.argmin())] if d.min() <= tolerance else None


def _coverage(shape: str, cx: float, cy: float, extent: float, h: int, w: int, ss: int = 4) -> np.ndarray:
    """The outline's antialiased coverage in an ``h x w`` window (same rasteriser as ``render``)."""
    canvas = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(canvas).polygon(outline(shape, cx * ss, cy * ss, extent * ss), fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0


class ShapesOracle:
    """``oracle(image, question) -> "yes" | "no"`` for the shapes world; ``batch`` as the VQA backends.

    Tolerances are loose enough for generated images (colours off by a shade, soft edges) and
    tight enough that a blob of the wrong kind is not accepted; exact renders are far inside them.
    """

    name = "shapes-oracle"

    def __init__(
        self,
        *,
        fg_threshold: float = 40.0,
        colour_tolerance: float = 90.0,
        background_tolerance: float = 80.0,
        max_residual: float = 0.25,
        min_area: float = 0.002,
        cache_size: int = 512,
    ):
        self.fg_threshold = fg_threshold
        self.colour_tolerance = colour_tolerance
        self.background_tolerance = background_tolerance
        self.max_residual = max_residual
        self.min_area = min_area  # blobs below this fraction of the image are noise
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Analysis] = OrderedDict()

    def __call__(self, image: Image.Image, question: str) -> str:
        return "yes" if self.answer(self.analyse(image), question) else "no"

    def batch(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return [self(i, q) for i, q in zip(images, questions)]

    def analyse(self, image: Image.Image) -> Analysis:
        """What is in the image — cached by content, since every question of a tile asks the same image."""
        image = image.convert("RGB")
        key = (image.size, hashlib.sha1(image.tobytes()).digest())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = self._analyse(np.asarray(image, dtype=np.float32))
        self._cache[key] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def _analyse(self, img: np.ndarray) -> Analysis:
        h, w, _ = img.shape
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        bg = np.median(border, axis=0)
        dist = np.linalg.norm(img - bg, axis=2)
        labels, _ = ndimage.label(dist > self.fg_threshold)
        cell = np.sqrt(h * w) / 3
        blobs = []
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            y0, y1 = max(box[0].start - 2, 0), min(box[0].stop + 2, h)
            x0, x1 = max(box[1].start - 2, 0), min(box[1].stop + 2, w)
            mine = labels[y0:y1, x0:x1] == k
            patch, d = img[y0:y1, x0:x1], dist[y0:y1, x0:x1]
            core = mine & (d >= 0.8 * d[mine].max())  # the blob's own colour, away from antialiased edges
            colour = np.median(patch[core], axis=0)
            v = colour - bg
            alpha = np.clip(((patch - bg) @ v) / float(v @ v), 0.0, 1.0)
            alpha *= ndimage.binary_dilation(mine, np.ones((3, 3), bool))
            area = float(alpha.sum())
            if area < self.min_area * h * w:
                continue
            ys, xs = np.mgrid[0 : y1 - y0, 0 : x1 - x0] + 0.5
            cy, cx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)
            fits = []
            for shape, (unit_area, ox, oy) in GEOMETRY.items():
                extent = np.sqrt(area / unit_area)
                centre = (cx - ox * extent, cy - oy * extent)
                template = _coverage(shape, *centre, extent, *alpha.shape)
                for sigma in BLURS:  # generated images are often soft: compare with softened outlines too
                    soft = ndimage.gaussian_filter(template, sigma * h / 64, mode="constant") if sigma else template
                    fits.append((float(np.abs(alpha - soft).sum() / area), shape, extent, centre))
            residual, shape, extent, (fx, fy) = min(fits)
            blobs.append(
                Blob(
                    shape=shape if residual <= self.max_residual else None,
                    colour=_nearest(colour, COLOURS, self.colour_tolerance),
                    size="large" if extent / cell > LARGE_THRESHOLD else "small",
                    row=min(max(int((fy + y0) / (h / 3)), 0), 2),
                    col=min(max(int((fx + x0) / (w / 3)), 0), 2),
                    residual=residual,
                )
            )
        return Analysis(_nearest(bg, BACKGROUNDS, self.background_tolerance), tuple(blobs))

    @staticmethod
    def parse(question: str) -> tuple[str, dict[str, str]]:
        """``(kind, fields)`` of one of ``questions.py``'s wordings; anything else is an EllaError."""
        text = " ".join(question.strip().lower().split())
        for kind, pattern in PATTERNS:
            m = pattern.fullmatch(text)
            if m:
                fields = {k: v for k, v in m.groupdict().items() if v is not None}
                if "ap" in fields:
                    fields["a"] = SINGULAR[fields.pop("ap")]
                return kind, fields
        raise EllaError(
            f"the shapes oracle does not understand the question {question!r} "
            "(it answers only the wordings of ella.shapes.questions)"
        )

    def answer(self, seen: Analysis, question: str) -> bool:
        kind, f = self.parse(question)
        if kind == "background":
            return seen.background == f["v"]
        blobs = seen.of(f["a"])
        if kind == "entity":
            return bool(blobs)
        if kind == "colour":
            return bool(blobs) and all(b.colour == f["v"] for b in blobs)
        if kind == "size":
            return bool(blobs) and all(b.size == f["v"] for b in blobs)
        if kind == "count":
            return len(blobs) == NUMBER[f["v"]]
        if kind == "position":
            return any((b.row, b.col) == CELLS[f["v"]] for b in blobs)
        others, relation = seen.of(f["b"]), f["v"]
        holds = {
            "left of": lambda a, b: a.col < b.col,
            "right of": lambda a, b: a.col > b.col,
            "above": lambda a, b: a.row < b.row,
            "below": lambda a, b: a.row > b.row,
        }[relation]
        return any(holds(a, b) for a in blobs for b in others)
