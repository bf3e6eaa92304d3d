"""Sliding windows in batches against one at a time: images/s of serve.slide on large images, per model.

python -m benchmarks.slide_batching --engines RUN/export [--models cnn vit ensemble] [--mosaic 8 16]
    [--split test] [--rounds 5]

One mosaic of R x C tiles of the split's images (512x1024 from the 64x64 synthetic set), slid with the engines'
own window and stride, timed in interleaved rounds (serve.decide): `batch=1` against the engines' largest batch.
Prints the per-image times and the speed-up with its 95 % interval.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from benchmarks.evaluate import mosaics
from serve.decide import interleaved, speedup_of
from serve.manifest import read_manifest
from serve.segmenter import MODELS, STUDENTS, load_segmenter
from serve.slide import slide, sliding
from train.data import build_dataset
from train.run_dir import load_run_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slide_batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--engines", required=True, type=Path, help="an export dir (RUN/export)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--mosaic", nargs=2, type=int, default=[8, 16], metavar=("R", "C"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_run_config(args.engines.parent)
    image, _ = next(mosaics(build_dataset(cfg.data, args.split, train=False), 1, tuple(args.mosaic)))
    max_batch = read_manifest(args.engines / STUDENTS[0]).shapes["max"][0]
    print(f"{image.shape[0]}x{image.shape[1]} image; max batch {max_batch}")
    print("| model | windows | one at a time (ms / image) | batched (ms / image) | speed-up [95 % interval] |")
    print("|---|---:|---:|---:|---:|")
    for model in args.models:
        segmenter = load_segmenter(args.engines, model, scores=True)
        s = sliding(segmenter)
        runs = {"single": partial(slide, segmenter, s=s, batch=1), "batched": partial(slide, segmenter, s=s)}
        times = interleaved(runs, image, rounds=args.rounds, calls=1)
        up = speedup_of(times["single"], times["batched"])
        windows = slide(segmenter, image, s).windows
        interval = f"{up.ratio:.2f}x [{up.low:.2f}, {up.high:.2f}]"
        print(f"| {model} | {windows} | {up.a_ms:.0f} | {up.b_ms:.0f} | {interval} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
