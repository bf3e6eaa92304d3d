"""Check a dataset before a long run: every image and mask of every split the config trains and
evaluates on is read once.

python -m train.data.check --config configs/cityscapes.yaml [key.sub=value ...]

Prints image and mask counts per split, each class's share of the labelled pixels (and in how many
images it appears), classes no split has a pixel of, and every problem, naming the file: unreadable
or truncated files, images without masks, image/mask size mismatches, label values outside the classes.
With `data.labeled` and `data.unlabeled` (few labels, many images), also how many of the train split's
images keep their masks and the unlabelled folder: its images, their sizes, and files that are masks,
unreadable or smaller than the crop.
Exit status 1 when there is a problem that would stop training, 2 when the config or layout is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from train.config import ConfigError, DataConfig, load_config
from train.data import LAYOUTS, build_dataset
from train.data.dataset import IGNORE_INDEX, DatasetError, Sample, read_image, read_mask, size_mismatch
from train.data.unlabeled import folder_images, image_problem, labeled_subset


@dataclass
class SplitReport:
    name: str
    images: int = 0
    masks: int = 0
    pixels: np.ndarray | None = None  # labelled pixels per class
    images_with: np.ndarray | None = None  # images holding each class
    ignored: int = 0
    problems: list[str] = field(default_factory=list)


def check_sample(sample: Sample, label_map: np.ndarray | None, num_classes: int) -> tuple[np.ndarray | None, list]:
    """(per-class pixel counts incl. ignore as the last entry, or None; problems)."""
    problems = []
    try:
        image = read_image(sample.image)
    except DatasetError as e:
        problems.append(str(e))
        image = None
    if not sample.mask.is_file():
        return None, [*problems, f"image without mask: {sample.image} (expected {sample.mask})"]
    try:
        mask = read_mask(sample.mask, label_map, num_classes)
    except DatasetError as e:
        return None, [*problems, str(e)]
    if image is not None and image.shape[:2] != mask.shape:
        problems.append(size_mismatch(sample.mask, mask.shape[::-1], image.shape[1::-1]))
    counts = np.bincount(np.where(mask == IGNORE_INDEX, num_classes, mask).ravel(), minlength=num_classes + 1)
    return counts, problems


def check_split(cfg: DataConfig, split: str, workers: int) -> tuple[SplitReport, list[str]]:
    samples, classes, label_map = LAYOUTS[cfg.format](Path(cfg.root), split)
    k = classes.num_classes
    report = SplitReport(split, images=len(samples), masks=sum(s.mask.is_file() for s in samples))
    report.pixels, report.images_with = np.zeros(k, np.int64), np.zeros(k, np.int64)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda s: check_sample(s, label_map, k), samples)
        for counts, problems in tqdm(results, total=len(samples), desc=split, unit="img", file=sys.stderr):
            report.problems += problems
            if counts is not None:
                report.pixels += counts[:k]
                report.images_with += counts[:k] > 0
                report.ignored += int(counts[k])
    return report, classes.names


def check_unlabeled(cfg: DataConfig, workers: int) -> tuple[list[str], list[str]]:
    """The few-labels lines of the report (the labelled subset, the unlabelled folder) and the folder's
    problems, every file decoded."""
    lines = []
    if cfg.labeled is not None:
        split = build_dataset(cfg, cfg.train_split, train=False)
        kept = len(labeled_subset(split, cfg))
        lines.append(f"{cfg.train_split}: {kept} of {len(split)} images keep their masks (data.labeled={cfg.labeled})")
    if cfg.unlabeled is None:
        return lines, []
    folder = Path(cfg.root) / cfg.unlabeled
    images = folder_images(folder)
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(lambda f: image_problem(f, cfg, decode=True), images) if p]
    lines.append(f"unlabelled: {len(images)} images in {folder} (data.unlabeled), {len(problems)} problems")
    return lines, problems


def format_report(cfg: DataConfig, reports: list[SplitReport], names: list[str]) -> str:
    lines = [f"{cfg.root} ({cfg.format}), {len(names)} classes", "", "| split | images | masks | problems |"]
    lines.append("|---|---:|---:|---:|")
    lines += [f"| {r.name} | {r.images} | {r.masks} | {len(r.problems)} |" for r in reports]
    lines += ["", "Share of labelled pixels per class, and images holding it:", ""]
    lines.append("| class | " + " | ".join(f"{r.name} % | {r.name} images" for r in reports) + " |")
    lines.append("|---|" + "---:|---:|" * len(reports))
    for c, name in enumerate(names):
        cells = []
        for r in reports:
            total = max(int(r.pixels.sum()), 1)
            cells.append(f"{100 * r.pixels[c] / total:.2f} | {r.images_with[c]}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in reports:
        share = r.ignored / max(r.ignored + int(r.pixels.sum()), 1)
        lines.append(f"{r.name}: {100 * share:.1f} % of pixels ignored (255)")
        if absent := [names[c] for c in np.flatnonzero(r.pixels == 0)]:
            lines.append(f"{r.name}: no pixel of {len(absent)} classes: {', '.join(absent)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.data.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/cityscapes.yaml")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="files read at once")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/cityscapes")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        cfg = load_config(args.config, args.overrides).data
        splits = dict.fromkeys(s for s in (cfg.train_split, cfg.eval_split, cfg.test_split) if s)
        reports, names = [], []
        for split in splits:
            report, names = check_split(cfg, split, max(1, args.workers))
            reports.append(report)
        cfg.num_classes = len(names)  # what a mask in the unlabelled folder is told apart by
        few_labels, unlabeled_problems = check_unlabeled(cfg, max(1, args.workers))
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(cfg, reports, names))
    if few_labels:
        print("\n" + "\n".join(few_labels))
    problems = [p for r in reports for p in r.problems] + unlabeled_problems
    if problems:
        print(f"\n{len(problems)} problems that would stop training:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("\nno problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
