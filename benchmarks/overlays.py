"""What a run's engines see: a grid of held-out images, their labels, and each model's class map over them.

python -m benchmarks.overlays --run runs/demo [--images 4] [--split test] [--backend ort.cpu.fp32] [--out FILE]

One row per image (the first N of the split): the image, its labels, then the CNN's, the ViT's and the
ensemble's class maps from the exported engines, each blended over the image in the dataset's palette.
Writes RUN/overlays.png (or --out); `make demo` ends with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serve.segmenter import MODELS, load_segmenter
from train.data import IGNORE_INDEX, build_dataset
from train.run_dir import load_run_config


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Class colours over the image (ignored pixels show the image alone)."""
    colours = palette[np.where(labels == IGNORE_INDEX, 0, labels)].astype(np.float32)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.where((labels == IGNORE_INDEX)[..., None], image, mixed).astype(np.uint8)


def grid(rows: list[list[np.ndarray]], titles: list[str], scale: int) -> Image.Image:
    h, w = rows[0][0].shape[:2]
    cell_h, cell_w, head = h * scale, w * scale, 16
    canvas = Image.new("RGB", (cell_w * len(titles), head + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * cell_w + 4, 2), title, fill="black")
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (c * cell_w, head + r * cell_h))
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overlays", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, required=True, help="a run dir with its engines (make export)")
    p.add_argument("--images", type=int, default=4, help="rows: the first N images of the split")
    p.add_argument("--split", help="default: the config's test split, else its eval split")
    p.add_argument("--backend", default="ort.cpu.fp32", help="the backend every model runs on")
    p.add_argument("--scale", type=int, default=0, help="pixel scale of each cell (0: fit cells to ~192 px)")
    p.add_argument("--out", type=Path, help="default: RUN/overlays.png")
    args = p.parse_args(argv)
    try:
        cfg = load_run_config(args.run)
        split = args.split or cfg.data.test_split or cfg.data.eval_split
        dataset = build_dataset(cfg.data, split, train=False)
        segmenters = {m: load_segmenter(args.run / "export", m, args.backend) for m in MODELS}
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    palette = np.array(cfg.data.palette, np.uint8)
    rows = []
    for i in range(min(args.images, len(dataset))):
        image, labels = dataset.read(i)
        maps = [segmenters[m].predict(image).labels for m in MODELS]
        rows.append([image, blend(image, labels, palette), *(blend(image, m, palette) for m in maps)])
    scale = args.scale or max(1, 192 // max(rows[0][0].shape[:2]))
    out = args.out or args.run / "overlays.png"
    grid(rows, ["image", "labels", *MODELS], scale).save(out)
    print(f"wrote {out} ({len(rows)} {split} images, {args.backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
