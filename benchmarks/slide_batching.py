"""Sliding windows in batches against one at a time: images/s of serve.slide on large images, per model and
backend, with how close the batched run comes to this CPU's arithmetic ceiling.

python -m benchmarks.slide_batching --engines RUN/export [--models cnn vit ensemble] [--backends ort.cpu.fp32 ...]
    [--mosaic 8 16] [--split test] [--rounds 5]

One mosaic of R x C tiles of the split's images (512x1024 from the 64x64 synthetic set), slid with the engines'
own window and stride, timed in interleaved rounds (serve.decide): `batch=1` against the engines' largest batch.
Prints the per-image times, the speed-up with its 95 % interval, and the batched run's GFLOP/s (the PyTorch
students' FLOPs per window) against the GEMM peak of the backend's precision: a batched run near that peak is
compute-bound, and batching cannot take it further. A backend whose engine the export did not ship (refused by
the parity gate, or not exported) gets a row saying so.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from benchmarks.bench import model_gflop
from benchmarks.evaluate import mosaics
from benchmarks.hardware import gemm_peaks
from serve.backends import BACKENDS
from serve.decide import interleaved, speedup_of
from serve.manifest import ManifestError
from serve.segmenter import MODELS, engines_of, load_segmenter
from serve.slide import boxes, slide, sliding
from train.data import build_dataset
from train.run_dir import load_run_config, load_students

COLUMNS = ["backend", "model", "windows", "one at a time (ms / image)", "batched (ms / image)",
           "speed-up [95 % interval]", "batched GFLOP/s", "of the GEMM peak"]  # fmt: skip


def row(segmenter, image, rounds: int, students: list, peak: float) -> list[str]:
    """The cells after backend and model: windows, both times, the speed-up, the batched rate and its share."""
    s = sliding(segmenter)
    gflop_per_window = model_gflop(students, s.window)
    runs = {"single": partial(slide, segmenter, s=s, batch=1), "batched": partial(slide, segmenter, s=s)}
    times = interleaved(runs, image, rounds=rounds, calls=1)
    up = speedup_of(times["single"], times["batched"])
    windows = len(boxes(*image.shape[:2], s))
    rate = gflop_per_window * windows / (up.b_ms / 1e3)
    return [str(windows), f"{up.a_ms:.0f}", f"{up.b_ms:.0f}", f"{up.ratio:.2f}x [{up.low:.2f}, {up.high:.2f}]",
            f"{rate:.0f}", f"{rate / peak:.0%}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slide_batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--engines", required=True, type=Path, help="an export dir (RUN/export)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backends", nargs="+", default=["ort.cpu.fp32"], choices=sorted(BACKENDS))
    parser.add_argument("--mosaic", nargs=2, type=int, default=[8, 16], metavar=("R", "C"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_run_config(args.engines.parent)
    students = load_students(args.engines.parent, cfg)
    image, _ = next(mosaics(build_dataset(cfg.data, args.split, train=False), 1, tuple(args.mosaic)))
    peaks = gemm_peaks()
    print(f"{image.shape[0]}x{image.shape[1]} image; GEMM peaks (GFLOP/s): "
          + ", ".join(f"{p} {v:.0f}" for p, v in peaks.items()))  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |\n|---|---|" + "---:|" * (len(COLUMNS) - 2))
    for backend in args.backends:
        for model in args.models:
            try:
                segmenter = load_segmenter(args.engines, model, backend, scores=True)
            except (ManifestError, ValueError) as error:
                print(f"| {backend} | {model} | not run: {error} |" + " |" * (len(COLUMNS) - 3), flush=True)
                continue
            members = [students[s] for s in engines_of(model)[0]]
            cells = row(segmenter, image, args.rounds, members, peaks[BACKENDS[backend].precision])
            print("| " + " | ".join([backend, model, *cells]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
