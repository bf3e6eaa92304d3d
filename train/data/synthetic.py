"""The embedded default dataset: procedurally generated scenes written in the generic folder format.

Each object is one of four texture classes (solid, stripes, checker, speckle) drawn as a
random shape (disc, rectangle, triangle, ring or irregular blob) in random colours, so that
neither colour nor shape tells the class; random scale and rotation; later objects partly
occlude earlier ones; backgrounds are smooth random colour fields with a fine grain.
Every image is a pure function of (seed, split, index).

Why these classes: with random initialisation and a few CPU minutes, classes that only shape
tells apart stayed below 0.2 IoU (ResNet-18 DeepLabV3+, 600 iterations), and four periodic
two-colour textures (stripes, checker, dots, grid) stayed confused with each other; textures of
different statistics are learnt from local evidence, as road, vegetation and sky are.

    python -m train.data.synthetic --out data/synthetic [--train 800 --val 100 --test 500 --height 64 --width 64]
        [--jobs N]

Three splits: `train`; `val`, which training evaluates to pick each student's best weights; and
`test`, held out for the numbers a comparison reports (`data.test_split`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ["background", "solid", "stripes", "checker", "speckle"]
SHAPES = ["disc", "rectangle", "triangle", "ring", "blob"]
PALETTE = [
    [0, 0, 0],
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MAX_OVERLAP = 0.3  # share of a new object that may cover earlier ones
FORMAT = 2  # bump when the generator changes, so `generate` rewrites an older dataset
STAMP = "synthetic.json"  # the parameters a dataset was written with


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 255, 3)
        if avoid is None or np.abs(colour - avoid).sum() > 150:
            return colour


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], HxW."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth field between two random colours, with a grain of about 4 px that objects lack."""
    a, b = _random_colour(rng), _random_colour(rng)
    t = _smooth_field(rng, h, w, int(rng.integers(2, 5)))[..., None]
    grain = _smooth_field(rng, h, w, max(h, w) // 4)[..., None] - 0.5
    return a * t + b * (1 - t) + grain * rng.uniform(50, 90)


def _polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> list[tuple[float, float]]:
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))


def _shape_mask(shape: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Boolean HxW mask of one `shape` at a random place, size and angle."""
    r = rng.uniform(0.15, 0.4) * min(h, w)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    turn = rng.uniform(0, 2 * np.pi)
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    if shape == "disc":
        rx, ry = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        inner = r * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif shape == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        half = np.arctan(aspect)
        angles = turn + np.array([half, np.pi - half, np.pi + half, -half])
        draw.polygon(_polygon(cx, cy, np.full(4, r), angles), fill=1)
    elif shape == "triangle":
        angles = turn + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        draw.polygon(_polygon(cx, cy, np.full(3, r * 1.2), angles), fill=1)
    else:  # an irregular blob
        n = int(rng.integers(6, 10))
        angles = turn + np.sort(rng.uniform(0, 2 * np.pi, n))
        draw.polygon(_polygon(cx, cy, r * rng.uniform(0.6, 1.1, n), angles), fill=1)
    return np.asarray(canvas, dtype=bool)


def fill_frame(rng: np.random.Generator, h: int, w: int, under: np.ndarray) -> tuple[np.ndarray, ...]:
    """What every fill starts from: pixel coordinates (xx, yy), the same along a random angle (u, v), and its
    first colour, unlike `under` (the mean colour it covers) so that its outline is visible."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    return xx, yy, u, v, _random_colour(rng, avoid=under)


def shaded(rng: np.random.Generator, colour: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One colour with a gentle linear shading along u."""
    shade = (u - u.mean()) / max(u.shape) * rng.uniform(-40, 40)
    return colour + shade[..., None]


def _fill(texture: str, rng: np.random.Generator, h: int, w: int, under: np.ndarray) -> np.ndarray:
    """HxWx3 float colours of a texture class at a random angle and period (`fill_frame`)."""
    _, _, u, v, a = fill_frame(rng, h, w, under)
    if texture == "solid":
        return shaded(rng, a, u)
    b = _random_colour(rng, avoid=a)
    period = rng.uniform(6, 12)
    if texture == "stripes":  # periodic in one direction
        on = (u // (period / 2)) % 2 == 0
    elif texture == "checker":  # periodic in two
        on = (u // period + v // period) % 2 == 0
    else:  # speckle: aperiodic random cells of 2-3 px
        cell = int(rng.integers(2, 4))
        on = np.kron(rng.random((h // cell + 1, w // cell + 1)) < 0.5, np.ones((cell, cell), bool))[:h, :w]
    return np.where(on[..., None], a, b)


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (HxWx3 uint8 image, HxW uint8 class mask)."""
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        for _attempt in range(10):  # occlusion, but partial: an object is mostly visible
            region = _shape_mask(SHAPES[rng.integers(len(SHAPES))], rng, height, width)
            if region.any() and (mask[region] > 0).mean() < MAX_OVERLAP:
                break
        else:
            continue
        image[region] = _fill(CLASS_NAMES[cls], rng, height, width, image[region].mean(0))[region]
        mask[region] = cls
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


@dataclass(frozen=True)
class Scene:
    """What a synthetic set draws: its class table and one picklable `render(rng, height, width)`.
    `params` are what the renderer depends on beyond the code (hashed with `format` into the stamp)."""

    name: str
    format: int  # bump when the renderer changes, so `generate` rewrites an older dataset
    names: list[str]
    palette: list[list[int]]
    render: Callable[[np.random.Generator, int, int], tuple[np.ndarray, np.ndarray]]
    params: dict = field(default_factory=dict)


SCENE = Scene("synthetic", FORMAT, CLASS_NAMES, PALETTE, render)


def _write(out: Path, split: str, index: int, height: int, width: int, seed: int, scene: Scene) -> str:
    sample_id = f"{split}_{index:05d}"
    image, mask = scene.render(np.random.default_rng([seed, SPLIT_IDS[split], index]), height, width)
    Image.fromarray(image).save(out / "images" / f"{sample_id}.png")
    Image.fromarray(mask).save(out / "masks" / f"{sample_id}.png")
    return sample_id


def stamp(scene: Scene, **sizes: int) -> dict:
    """The parameters a dataset was written with, and their hash (the data's identity in a results file)."""
    params = {"scene": scene.name, "format": scene.format, **sizes, **scene.params}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return {**params, "hash": digest}


def generate(
    out: str | Path,
    num_train: int = 800,
    num_val: int = 100,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    num_test: int = 500,
    jobs: int = 1,
    scene: Scene = SCENE,
) -> Path:
    """Write the dataset; a second call with the same parameters (and generator format) does nothing.
    A split's images depend only on (seed, split, index), so adding a split leaves the others as they were,
    and `jobs` processes write the same files as one."""
    out = Path(out)
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    params = stamp(scene, **sizes, height=height, width=width, seed=seed)
    stamp_file = out / STAMP
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == params:
        return out
    for sub in ("images", "masks", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        run = partial(pool.map, chunksize=16) if pool else map
        for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
            write = partial(_write, out, split, height=height, width=width, seed=seed, scene=scene)
            ids = run(write, range(count))
            (out / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.json").write_text(json.dumps({"names": scene.names, "palette": scene.palette}, indent=1))
    stamp_file.write_text(json.dumps(params))
    return out


def parser(scene: Scene = SCENE, sizes: dict | None = None, doc: str | None = __doc__) -> argparse.ArgumentParser:
    """The generator's command line; `sizes` are a scene's default split sizes."""
    sizes = {"train": 800, "val": 100, "test": 500} | (sizes or {})
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=f"data/{scene.name}")
    for split, count in sizes.items():
        p.add_argument(f"--{split}", type=int, default=count, help=f"images in the {split} split")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="processes that render images (same files as one)")
    return p


def write(args: argparse.Namespace, scene: Scene) -> None:
    out = generate(args.out, args.train, args.val, args.height, args.width, args.seed, args.test, args.jobs, scene)
    print(
        f"{scene.name} dataset: {args.train} train + {args.val} val + {args.test} test images "
        f"({args.height}x{args.width}) in {out}"
    )


def main(argv: list[str] | None = None) -> int:
    write(parser().parse_args(argv), SCENE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
