"""A synthetic set built for complementary knowledge: some classes told apart by fine local evidence,
some only by evidence elsewhere in the scene (the object's whole outline, or a cue far from it).

Every class is one row of `CLASSES`: the group it is designed for, the shapes it is drawn as and its fill.
Which student wins which class is a hypothesis the method's gate measures
(benchmarks/results/ablation-complementary.md), not a fact this file states.

    python -m train.data.complementary --out data/complementary [--seed 0] [--jobs N]

Every image is a pure function of (seed, split, index) and the parameters; their hash is written to
`synthetic.json` beside the format version, so a result can name the exact data it ran on.
"""

from __future__ import annotations

import colorsys
import dataclasses
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from train.data import synthetic
from train.data.synthetic import SHAPES, Scene, _background, _random_colour, _shape_mask, fill_frame, shaded


@dataclass(frozen=True)
class ObjectClass:
    group: str  # the evidence it is designed to need: "local", "outline", "context", "line"
    shapes: tuple[str, ...]  # drawn as one of these (all: shape says nothing of the class)
    fill: str  # how its pixels look (see _paint)


# Candidate classes; `classes` picks the set a dataset holds (background always first).
CLASSES = {
    "fine_stripes": ObjectClass("local", SHAPES, "fine_stripes"),  # period 2-3 px
    "fine_noise": ObjectClass("local", SHAPES, "fine_noise"),  # 1-px binary noise
    "checker1": ObjectClass("local", SHAPES, "checker1"),  # 1-px checkerboard
    "speckle": ObjectClass("local", SHAPES, "speckle"),  # random cells of 2-3 px
    "coarse_checker": ObjectClass("local", SHAPES, "coarse_checker"),  # period 8-12 px
    "disc": ObjectClass("outline", ("disc",), "flat"),
    "triangle": ObjectClass("outline", ("triangle",), "flat"),
    "square": ObjectClass("outline", ("square",), "flat"),
    "cue_warm": ObjectClass("context", SHAPES, "coarse_checker"),  # the scene's cue is warm
    "cue_cool": ObjectClass("context", SHAPES, "coarse_checker"),  # the scene's cue is cool
    "line": ObjectClass("line", (), "line"),
}
# The set the method is measured on (benchmarks/results/ablation-complementary.md: the probes that chose it).
DEFAULT_CLASSES = ["cue_warm", "cue_cool", "disc", "triangle", "square", "fine_stripes", "speckle"]
FORMAT = 1
CUE_CLEARANCE = 6  # px between the cue and any object: the cue is never next to what it labels


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255


def _square(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    r = rng.uniform(0.15, 0.35) * min(h, w)
    cx, cy, turn = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, rng.uniform(0, np.pi / 2)
    angles = turn + np.arange(4) * np.pi / 2 + np.pi / 4
    canvas = Image.new("L", (w, h))
    ImageDraw.Draw(canvas).polygon(list(zip(cx + r * np.cos(angles), cy + r * np.sin(angles), strict=True)), fill=1)
    return np.asarray(canvas, dtype=bool)


def _mask(shape: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return _square(rng, h, w) if shape == "square" else _shape_mask(shape, rng, h, w)


def _paint(fill: str, rng: np.random.Generator, h: int, w: int, under: np.ndarray) -> np.ndarray:
    """HxWx3 float colours of a fill, in colours that differ from `under` (the mean colour it covers)."""
    xx, yy, u, v, a = fill_frame(rng, h, w, under)
    if fill == "flat":
        return shaded(rng, a, u)
    b = _random_colour(rng, avoid=a)
    if fill == "fine_stripes":
        on = (u // (rng.uniform(2, 3) / 2)) % 2 == 0
    elif fill == "coarse_stripes":
        on = (u // (rng.uniform(6, 10) / 2)) % 2 == 0
    elif fill == "coarse_checker":
        period = rng.uniform(8, 12)
        on = (u // period + v // period) % 2 == 0
    elif fill == "checker1":
        on = (xx + yy) % 2 == 0
    elif fill == "fine_noise":
        on = rng.random((h, w)) < 0.5
    else:  # speckle: random cells of 2-3 px
        cell = int(rng.integers(2, 4))
        on = np.kron(rng.random((h // cell + 1, w // cell + 1)) < 0.5, np.ones((cell, cell), bool))[:h, :w]
    return np.where(on[..., None], a, b)


def _cue(rng: np.random.Generator, image: np.ndarray, warm: bool) -> np.ndarray:
    """A strip along one image edge in a warm (red-yellow) or cool (cyan-blue) hue; returns its mask."""
    h, w = image.shape[:2]
    width = int(rng.integers(4, 7))
    mask = np.zeros((h, w), bool)
    edge = rng.integers(4)
    if edge == 0:
        mask[:width] = True
    elif edge == 1:
        mask[-width:] = True
    elif edge == 2:
        mask[:, :width] = True
    else:
        mask[:, -width:] = True
    hue = rng.uniform(-0.05, 0.12) if warm else rng.uniform(0.5, 0.67)
    image[mask] = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    return mask


def _lines(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """1-2 random polylines, 1-2 px wide."""
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 3))):
        points = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 5)))]
        draw.line(points, fill=1, width=int(rng.integers(1, 3)))
    return np.asarray(canvas, dtype=bool)


def render(
    rng: np.random.Generator, height: int, width: int, classes: tuple[str, ...] = tuple(DEFAULT_CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """One scene of `classes` (class 0 is background): (HxWx3 uint8 image, HxW uint8 class mask)."""
    index = {name: i + 1 for i, name in enumerate(classes)}
    objects = [c for c in classes if CLASSES[c].group != "line"]  # a cue class: the scene's cue names it
    has_cue = "cue_warm" in index
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    taken = np.zeros((height, width), bool)
    warm = bool(rng.integers(2))
    if has_cue:
        cue = _cue(rng, image, warm)
        grown = Image.fromarray(cue.astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * CUE_CLEARANCE + 1))
        taken |= np.asarray(grown, dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        name = objects[rng.integers(len(objects))]
        cls = CLASSES[name]
        if CLASSES[name].group == "context":
            name = "cue_warm" if warm else "cue_cool"
        for _attempt in range(30):  # whole, off the cue's zone; occluded, but partially: mostly visible
            region = _mask(cls.shapes[rng.integers(len(cls.shapes))], rng, height, width)
            if region.sum() > 20 and not (region & taken).any() and (mask[region] > 0).mean() < synthetic.MAX_OVERLAP:
                break
        else:
            continue
        image[region] = _paint(cls.fill, rng, height, width, image[region].mean(0))[region]
        mask[region] = index[name]
    if "line" in index:
        region = _lines(rng, height, width) & ~taken
        image[region] = _random_colour(rng, avoid=image[region].mean(0) if region.any() else None)
        mask[region] = index["line"]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


# Distinct label colours, background first.
_PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48]]
_PALETTE += [[145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128]]


def scene(classes: list[str] | tuple[str, ...] = tuple(DEFAULT_CLASSES)) -> Scene:
    """The dataset of `classes` (background first); its stamp hashes every class row it draws."""
    if unknown := [c for c in classes if c not in CLASSES]:
        raise ValueError(f"unknown classes {unknown}: known {', '.join(CLASSES)}")
    names = ["background", *classes]
    rows = {c: dataclasses.asdict(CLASSES[c]) for c in classes}
    return Scene(
        "complementary",
        FORMAT,
        names,
        _PALETTE[: len(names)],
        partial(render, classes=tuple(classes)),
        {"classes": list(classes), "rows": rows},
    )


def groups(classes: list[str]) -> dict[str, list[str]]:
    """Class names by the evidence they are designed to need."""
    out: dict[str, list[str]] = {}
    for c in classes:
        out.setdefault(CLASSES[c].group, []).append(c)
    return out


def main(argv: list[str] | None = None) -> int:
    cli = synthetic.parser(scene(), {"train": 1000, "val": 300, "test": 500}, __doc__)
    cli.add_argument("--classes", help="a candidate set, comma-separated (the probes; default: the frozen set)")
    args = cli.parse_args(argv)
    synthetic.write(args, scene(args.classes.split(",") if args.classes else DEFAULT_CLASSES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
