"""The parity gate: every engine against the PyTorch student it came from (or, for an imported graph, the source
graph on ONNX Runtime fp32), on real eval images.

For each batch size the engine will be benchmarked at, the images are cut into batches of that
size (a different image in every slot: TensorRT has returned wrong SegFormer results at batch > 1
while reporting success), the student and each engine run on identical inputs, and both class
maps go through the same post-processing (bilinear resize of logits to the input, argmax).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from export.graphs import LogitsModel
from train.data import IGNORE_INDEX, SegmentationDataset, transforms
from train.metrics import ConfusionMatrix

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Threshold:
    agreement: float  # minimum share of pixels whose class equals the student's
    miou_delta: float  # maximum |mIoU(engine) - mIoU(student)| on the parity images


DEFAULT_THRESHOLDS = {"fp32": Threshold(0.999, 0.001), "reduced": Threshold(0.99, 0.01)}


class ParityError(RuntimeError):
    """An engine failed its gate; the message lists which, at which batch size, and the numbers."""


def threshold_for(precision: str, thresholds: dict[str, Threshold] = DEFAULT_THRESHOLDS) -> Threshold:
    return thresholds["fp32" if precision == "fp32" else "reduced"]


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float NCHW, the `logits` engines' input, normalised exactly as in training."""
    return np.ascontiguousarray(transforms.normalise(pixels).transpose(0, 3, 1, 2))


def torch_reference(student: nn.Module) -> Runner:
    """A PyTorch student as the gate's reference: normalised NCHW in, its logits at the input size out (what the
    `logits` graph computes)."""
    model = LogitsModel(student).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


def memoised(reference: Runner, budget_mib: float = 512) -> Runner:
    """`reference` with its outputs kept by input (shape and a digest of the bytes) while they fit in
    `budget_mib`: an export gates several groups of engines (floats, int8, each fp32-island try) on the same
    images, a bench scores every backend against it. The outputs are shared: callers only read them."""
    kept: dict[tuple, np.ndarray] = {}
    room = budget_mib * 2**20

    def run(x: np.ndarray) -> np.ndarray:
        nonlocal room
        key = (x.shape, hashlib.blake2b(np.ascontiguousarray(x).data, digest_size=16).digest())
        if (out := kept.get(key)) is None:
            out = reference(x)
            if out.nbytes <= room:
                kept[key], room = out, room - out.nbytes
        return out

    return run


def batches(dataset: SegmentationDataset, count: int, size: int):
    """The split's first `count` images (at least) in full batches of `size`: uint8 NHWC pixels, labels
    (ignore-padded) and the mask of real (unpadded) pixels. The last batch is filled up with the next images,
    so every batch has the one shape an engine compiles for (OpenVINO compiles per shape); a split with fewer
    images repeats them, masked out."""
    total = -(-min(count, len(dataset)) // size) * size
    for start in range(0, total, size):
        indices = range(start, start + size)
        pairs = [dataset.read(i % len(dataset)) for i in indices]
        h = max(m.shape[0] for _, m in pairs)
        w = max(m.shape[1] for _, m in pairs)
        pixels = np.zeros((len(pairs), h, w, 3), np.uint8)
        labels = np.full((len(pairs), h, w), IGNORE_INDEX, np.uint8)
        real = np.zeros((len(pairs), h, w), bool)
        for slot, (i, (image, mask)) in enumerate(zip(indices, pairs, strict=True)):
            pixels[slot, : mask.shape[0], : mask.shape[1]] = image
            if i < len(dataset):  # a repeat counts once
                labels[slot, : mask.shape[0], : mask.shape[1]] = mask
                real[slot, : mask.shape[0], : mask.shape[1]] = True
        yield pixels, labels, real


class _Tally:
    def __init__(self, num_classes: int) -> None:
        self.same = self.total = 0
        self.max_err, self.err_sum, self.err_count = 0.0, 0.0, 0
        self.engine, self.torch = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)

    def add(self, pred: np.ndarray, ref: np.ndarray, labels: np.ndarray, real: np.ndarray) -> int:
        """Adds a batch; returns how many of its real pixels agree."""
        same = int((pred == ref)[real].sum())
        self.same += same
        self.total += int(real.sum())
        target = torch.from_numpy(labels.astype(np.int64))
        self.engine.update(torch.from_numpy(pred.astype(np.int64)), target)
        self.torch.update(torch.from_numpy(ref.astype(np.int64)), target)
        return same

    def add_logits(self, logits: np.ndarray, ref: np.ndarray, real: np.ndarray) -> None:
        # reduced over the classes first, then masked per pixel: masking the NCHW error itself gathers every
        # element through a strided view (at 4x150x512x512, 10x slower than the engine run it checks)
        err = np.subtract(logits, ref, dtype=np.float32)  # one array of the batch's size, made once
        np.abs(err, out=err)
        self.max_err = max(self.max_err, float(err.max(axis=1)[real].max()))
        self.err_sum += float(err.sum(axis=1)[real].sum(dtype=np.float64))
        self.err_count += int(real.sum()) * err.shape[1]

    def result(self) -> dict:
        engine, reference = self.engine.compute()["miou"], self.torch.compute()["miou"]
        out = {"agreement": self.same / max(1, self.total), "miou": engine, "miou_torch": reference}
        if self.err_count:
            out |= {"max_abs_logit_error": self.max_err, "mean_abs_logit_error": self.err_sum / self.err_count}
        return out


@dataclass
class Candidate:
    """An engine under test: how to run it, its I/O mode and its precision."""

    name: str
    io: str
    precision: str
    run: Runner


def gate_sizes(shapes: dict[str, list[int]]) -> list[tuple[int, int]]:
    """Input sizes the gate also checks, inside the profile: its corners (the smallest and largest, and the two
    extreme aspect ratios), the serving size, and sizes that are no multiple of 32 (where a resize or a padding
    mismatch shows)."""
    (_, h0, w0), (_, ho, wo), (_, h1, w1) = shapes["min"], shapes["opt"], shapes["max"]
    clip = lambda h, w: (min(max(h, h0), h1), min(max(w, w0), w1))  # noqa: E731
    sizes = [(h0, w0), (h1, w1), (h0, w1), (h1, w0), (ho, wo), clip(ho + 5, wo + 11), clip(h0 + 13, w1 - 7)]
    return list(dict.fromkeys(sizes))


def boxes(shapes: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The profiles a narrowed engine may ship for, widest first, each inside `shapes` with its serving size at a
    corner: the serving size and larger, then up to the serving size (a box reaching the size where it failed
    never passes: such a failure is at a corner or off the grid between)."""
    (_, h0, w0), (_, ho, wo), (n, h1, w1) = shapes["min"], shapes["opt"], shapes["max"]
    spans = [((ho, wo), (h1, w1)), ((h0, w0), (ho, wo))]
    return [{"min": [1, *low], "opt": [1, ho, wo], "max": [n, *high]} for low, high in spans if low != high]


def inside(box: dict[str, list[int]], point: str) -> bool:
    """Whether a gate point ("HxW@b") lies in `box`."""
    (h, w), batch = map(int, point.split("@")[0].split("x")), int(point.split("@")[1])
    return box["min"][1] <= h <= box["max"][1] and box["min"][2] <= w <= box["max"][2] and batch <= box["max"][0]


def resized_images(dataset: SegmentationDataset, count: int, size: tuple[int, int]) -> np.ndarray:
    """The split's first `count` images resized to `size` (height, width): uint8 NHWC."""
    h, w = size
    images = [dataset.read(i)[0] for i in range(min(count, len(dataset)))]
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in images])


Points = dict[str, list]  # "HxW@b" -> [pixels checked there, {engine: pixels that agree}]


def size_sweep(reference: Runner, candidates, dataset, sizes, max_batch: int,
               points: Points | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each engine's pixel agreement with the reference on eval images resized to every size, at batch 1 and at
    the profile's largest batch: {engine: {"HxW@b": agreement}}. Both batch sizes run the same images (the first
    `max_batch` of the split), at batch 1 one at a time: one image alone measured the demo's int8 engines 0.8-3.1
    points off their value over 16 (benchmarks/results/precision-cpu.md). A point that `points` already holds
    for at least `max_batch` images (the gate's own batches at the serving size) is not run again."""
    points = {} if points is None else points
    names, keys = [c.name for c in candidates], []
    for h, w in sizes:
        keys += [f"{h}x{w}@{b}" for b in dict.fromkeys([1, max_batch])]
        todo = [b for b in dict.fromkeys([1, max_batch]) if points.get(f"{h}x{w}@{b}", [0])[0] < max_batch * h * w]
        resized = resized_images(dataset, max_batch, (h, w)) if todo else None
        for b in todo:
            images = np.resize(resized, (max(b, len(resized)), h, w, 3))  # repeats the pool where the batch is larger
            count = points[f"{h}x{w}@{b}"] = [images[..., 0].size, dict.fromkeys(names, 0)]
            for start in range(0, len(images), b):
                pixels = images[start : start + b]
                x = normalise(pixels)
                ref = reference(x).argmax(1)
                for c in candidates:
                    out = c.run(pixels if c.io == "labels" else x)
                    count[1][c.name] += int(((out.argmax(1) if c.io == "logits" else out) == ref).sum())
    return {n: {key: points[key][1][n] / points[key][0] for key in keys} for n in names}


def check(
    reference: Runner,
    candidates: Sequence[Candidate],
    dataset: SegmentationDataset,
    images: int,
    batch_sizes: Sequence[int],
    thresholds: dict[str, Threshold] = DEFAULT_THRESHOLDS,
    shapes: dict[str, list[int]] | None = None,
) -> dict[str, dict]:
    """Run the gate against `reference` (the student, `torch_reference`, or an imported graph on ONNX Runtime
    fp32); returns {engine name: report}. The reference runs once per batch, shared by all. With the profile's
    `shapes`, every engine must also agree at each of `gate_sizes`, at batch 1 and the largest batch."""
    k = dataset.classes.num_classes
    tallies = {c.name: {b: _Tally(k) for b in batch_sizes} for c in candidates}
    points: Points = {}  # what the batches below checked, by shape: the sweep does not run them again
    for b in batch_sizes:
        for pixels, labels, real in batches(dataset, images, b):
            x = normalise(pixels)
            ref_logits = reference(x)
            ref = ref_logits.argmax(1)
            point = points.setdefault(f"{pixels.shape[1]}x{pixels.shape[2]}@{b}", [0, {}])
            point[0] += int(real.sum())
            for c in candidates:
                out = c.run(pixels if c.io == "labels" else x)
                tally = tallies[c.name][b]
                if c.io == "logits":
                    tally.add_logits(out, ref_logits, real)
                    out = out.argmax(1)
                point[1][c.name] = point[1].get(c.name, 0) + tally.add(out, ref, labels, real)

    sweep = size_sweep(reference, candidates, dataset, gate_sizes(shapes), shapes["max"][0], points) if shapes else {}
    reports = {}
    for c in candidates:
        limit = threshold_for(c.precision, thresholds)
        per_batch = {str(b): t.result() for b, t in tallies[c.name].items()}
        sizes = sweep.get(c.name, {})
        agreement = min([r["agreement"] for r in per_batch.values()] + list(sizes.values()))
        delta = max(abs(r["miou"] - r["miou_torch"]) for r in per_batch.values())
        reports[c.name] = {
            "images": min(images, len(dataset)),
            "batch_sizes": per_batch,
            "sizes": sizes,
            "agreement": agreement,
            "miou_delta": delta,
            "threshold": asdict(limit),
            "passed": agreement >= limit.agreement and delta <= limit.miou_delta,
        }
    return reports


def only_elsewhere(report: dict, serving: tuple[int, int]) -> bool:
    """Whether a refused engine failed only away from the serving size: every batch of the gate's own images and
    each sweep point at the serving size within its thresholds. Such an engine can ship for that size alone."""
    bar, here = report["threshold"], f"{serving[0]}x{serving[1]}@"
    at_serving = [v for k, v in report["sizes"].items() if k.startswith(here)]
    batches = [r["agreement"] for r in report["batch_sizes"].values()] + at_serving
    return bool(at_serving) and min(batches) >= bar["agreement"] and report["miou_delta"] <= bar["miou_delta"]


def failures(reports: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in reports.items():
        if r["passed"]:
            continue
        points = {f"batch {b}": v["agreement"] for b, v in r["batch_sizes"].items()}
        points |= {f"size {k}": v for k, v in r.get("sizes", {}).items()}
        worst = min(points, key=points.get)
        lines.append(
            f"{name}: pixel agreement {100 * r['agreement']:.2f}% (needs {100 * r['threshold']['agreement']:.1f}%), "
            f"|dmIoU| {r['miou_delta']:.4f} (max {r['threshold']['miou_delta']}); worst at {worst}"
        )
    return lines
