"""Evaluation of both students and their ensemble (mean of softmax), one confusion matrix each.

python -m train.evaluate --run runs/<name> [--split val] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from train.config import EvalConfig
from train.data import build_dataset, pad_collate
from train.data.transforms import fit_scale
from train.metrics import Complementarity, ConfusionMatrix, class_map
from train.run_dir import load_run_config, load_students, resolve_device

log = logging.getLogger(__name__)


def _windows(size: int, window: int, stride: int) -> list[int]:
    last = max(size - window, 0)
    return sorted({min(start, last) for start in range(0, last + stride, stride)})


def predict_logits(model: nn.Module, images: torch.Tensor, eval_cfg: EvalConfig, crop: list[int]) -> torch.Tensor:
    """Logits at input resolution (fp32): whole image, or averaged over overlapping windows; with
    `eval_cfg.scale`, predicted on the image rescaled to fit it and resized back."""
    h, w = images.shape[-2:]
    if eval_cfg.scale:
        factor = fit_scale(h, w, tuple(eval_cfg.scale))
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        resized = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        logits = predict_logits(model, resized, dataclasses.replace(eval_cfg, scale=None), crop)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    if eval_cfg.mode == "whole":
        return F.interpolate(model(images).logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    wh, ww = eval_cfg.crop_size or crop
    sh, sw = eval_cfg.stride or [max(1, wh * 2 // 3), max(1, ww * 2 // 3)]
    total, count = None, images.new_zeros(1, 1, h, w)
    for top in _windows(h, wh, sh):
        for left in _windows(w, ww, sw):
            window = images[..., top : top + wh, left : left + ww]
            logits = F.interpolate(
                model(window).logits.float(), size=window.shape[-2:], mode="bilinear", align_corners=False
            )
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], h, w)
            total[..., top : top + wh, left : left + ww] += logits
            count[..., top : top + wh, left : left + ww] += 1
    return total / count


@torch.no_grad()
def evaluate(
    students: dict[str, nn.Module],
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    device: torch.device,
    eval_cfg: EvalConfig | None = None,
    crop: list[int] = (512, 512),
) -> dict[str, dict]:
    """Metrics of each student and, for two or more, of their ensemble (mean of softmax); for two, also
    of their oracle (`Complementarity`: a student that is right, per pixel). Always in fp32, also during
    mixed-precision training: the numbers then match `train.evaluate` and the fp32 engines the export
    checks against."""
    eval_cfg = eval_cfg or EvalConfig()
    names = list(students) + (["ensemble"] if len(students) > 1 else [])
    matrices = {name: ConfusionMatrix(num_classes, device) for name in names}
    pair = Complementarity(num_classes, device) if len(students) == 2 else None
    was_training = {name: m.training for name, m in students.items()}
    for m in students.values():
        m.eval()
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        probs, preds = 0, []
        for name, model in students.items():
            logits = predict_logits(model, images, eval_cfg, list(crop))
            preds.append(class_map(logits))
            matrices[name].update(preds[-1], labels)
            probs = probs + logits.softmax(1)
        if "ensemble" in matrices:
            matrices["ensemble"].update(class_map(probs), labels)
        if pair is not None:
            pair.update(*preds, labels)
    for name, m in students.items():
        m.train(was_training[name])
    results = {}
    for name, matrix in matrices.items():
        matrix.all_reduce()
        results[name] = matrix.compute()
    if pair is not None:
        pair.all_reduce()
        a, b = students
        results["oracle"] = pair.compute(results[a]["miou"] >= results[b]["miou"])
    return results


def eval_loader(
    dataset, batch_size: int, num_workers: int, max_images: int | None = None, rank: int = 0, world: int = 1
) -> torch.utils.data.DataLoader:
    """The first `max_images` of a split; with `world > 1`, this rank's disjoint share of them (every
    image counted once once the confusion matrices are summed over ranks)."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count < len(dataset) or world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, count, world))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=pad_collate,
        generator=torch.Generator(),  # leaves the global RNG (training's dropout) untouched
    )


def format_table(results: dict[str, dict], class_names: list[str] | None = None) -> str:
    """A Markdown table: one row per model, mIoU and pixel accuracy in percent, then per-class IoU."""

    def pct(v: float | None) -> str:
        return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    names = class_names or [str(i) for i in range(len(next(iter(results.values()))["iou"]))]
    lines = [
        "| model | mIoU | pixel acc | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for model, r in results.items():
        lines.append(f"| {model} | {pct(r['miou'])} | {pct(r['acc'])} | " + " | ".join(map(pct, r["iou"])) + " |")
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, split: str | None = None, device: str = "auto") -> dict:
    """Re-evaluate the best weights of a run dir on its eval split (or `split`)."""
    cfg = load_run_config(run_dir)
    dev = resolve_device(device)
    students = {name: m.to(dev) for name, m in load_students(run_dir, cfg).items()}
    split = split or cfg.data.eval_split
    dataset = build_dataset(cfg.data, split, train=False)
    loader = eval_loader(dataset, cfg.data.eval_batch_size, cfg.data.num_workers)
    results = evaluate(students, loader, cfg.data.num_classes, dev, cfg.eval, cfg.data.crop_size)
    return {"dataset": cfg.data.root, "split": split, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate", description="Re-evaluate a run dir's best weights."
    )
    parser.add_argument("--run", required=True, help="run dir, e.g. runs/demo")
    parser.add_argument("--split", default=None, help="eval split (default: the config's data.eval_split)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = evaluate_run(args.run, args.split, args.device)
    cfg = load_run_config(args.run)
    print(format_table({k: v for k, v in results.items() if isinstance(v, dict)}, cfg.data.class_names))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
