"""Accuracy of a run's engines on a dataset split, fitted or by sliding windows, beside its PyTorch students.

python -m benchmarks.evaluate --run runs/<name> [--split test] [--models cnn vit ensemble]
    [--backend ort.cpu.fp32] [--slide [--window H W] [--stride H W]] [--mosaic R C] [--images N]

Each model's mIoU over the split (one confusion matrix, the training's definition) for the engine in the
mode asked for, and for the PyTorch student in the same mode (training's `eval.mode=slide` with the same
window and stride), so a user sees on their own data which mode to deploy. `--mosaic R C` evaluates on
images made of R x C tiles of the split's images (and their masks): large images, where fitting an image
into the engines' size range loses detail that sliding windows keep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serve.segmenter import MODELS, STUDENTS, load_segmenter, resize
from serve.slide import slide, sliding
from train.config import EvalConfig
from train.data import build_dataset
from train.data.transforms import normalise
from train.evaluate import predict_logits
from train.metrics import ConfusionMatrix, class_map
from train.run_dir import load_run_config, load_student


def mosaics(dataset, count: int, tiles: tuple[int, int] | None):
    """(image, mask) pairs: the split's images, or mosaics of `tiles` of them (each tile cropped to the first's
    size), `count` in all."""
    if tiles is None:
        yield from (dataset.read(i) for i in range(min(count, len(dataset))))
        return
    per = tiles[0] * tiles[1]
    for m in range(min(count, len(dataset) // per)):
        pairs = [dataset.read(m * per + i) for i in range(per)]
        h, w = pairs[0][1].shape
        rows = [[pairs[r * tiles[1] + c] for c in range(tiles[1])] for r in range(tiles[0])]
        image = np.concatenate([np.concatenate([p[0][:h, :w] for p in row], 1) for row in rows], 0)
        mask = np.concatenate([np.concatenate([p[1][:h, :w] for p in row], 1) for row in rows], 0)
        yield image, mask


def evaluate(run_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """{model: {"engine": mIoU, "torch": mIoU}} in the mode asked for."""
    cfg = load_run_config(run_dir)
    dataset = build_dataset(cfg.data, args.split or cfg.data.test_split or cfg.data.eval_split, train=False)
    students = {s: load_student(run_dir, s, cfg) for s in STUDENTS}
    results = {}
    for model in args.models:
        segmenter = load_segmenter(run_dir / "export", model, args.backend, scores=True)
        s = sliding(segmenter, args.window, args.stride) if args.slide else None
        eval_cfg = EvalConfig(mode="slide", crop_size=list(s.window), stride=list(s.stride)) if s else EvalConfig()
        members = STUDENTS if model == "ensemble" else (model,)
        k = len(segmenter.classes)
        engine, reference = ConfusionMatrix(k), ConfusionMatrix(k)
        for image, mask in mosaics(dataset, args.images, tuple(args.mosaic) if args.mosaic else None):
            labels = slide(segmenter, image, s).labels if s else segmenter.predict(image).labels
            target = torch.from_numpy(mask.astype(np.int64))
            engine.update(torch.from_numpy(labels.astype(np.int64)), target)
            # the students the same way: windows as training's eval.mode=slide, or the image fitted as serve fits it
            fitted = image if s else resize(image, segmenter.fit(*image.shape[:2]), Image.BILINEAR)
            x = torch.from_numpy(normalise(fitted[None]).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                probs = sum(
                    predict_logits(students[m], x, eval_cfg, list(cfg.data.crop_size)).softmax(1) for m in members
                )
            ref = class_map(probs)[0].numpy().astype(np.uint8)
            reference.update(torch.from_numpy(resize(ref, mask.shape, Image.NEAREST).astype(np.int64)), target)
        results[model] = {"engine": engine.compute()["miou"], "torch": reference.compute()["miou"]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--split", help="default: the config's test split, else its eval split")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--backend", default="ort.cpu.fp32")
    parser.add_argument("--slide", action="store_true")
    parser.add_argument("--window", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--mosaic", type=int, nargs=2, metavar=("R", "C"), help="tiles per image")
    parser.add_argument("--images", type=int, default=100, help="images (or mosaics) evaluated")
    args = parser.parse_args(argv)
    mode = f"slide {args.window or 'serving size'} / {args.stride or '2/3 window'}" if args.slide else "fitted"
    print(f"| model | engine ({args.backend}, {mode}) | PyTorch, same mode | Δ |")
    print("|---|---:|---:|---:|")
    for model, r in evaluate(args.run, args).items():
        print(
            f"| {model} | {100 * r['engine']:.2f} | {100 * r['torch']:.2f} | {100 * (r['engine'] - r['torch']):+.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
