"""One interface over the engines: `predict(image) -> Prediction` (class map + stage timings).

A model is a student's `labels` engine (uint8 image in, class map out: argmax inside the graph),
or the ensemble of both students: the mean of their softmax, from their `logits` engines. Images
of any size are fitted into the engines' shape range (aspect kept), and the class map comes back
at the image's own size.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from serve.manifest import MANIFEST_FILE, read_manifest
from serve.runtime import BACKENDS, Engine, median_ms, open_engine

log = logging.getLogger(__name__)

STUDENTS = ("cnn", "vit")
MODELS = (*STUDENTS, "ensemble")


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) uint8 class indices at the input image's size
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage, of the batch it ran in
    batch: int = 1


class Segmenter:
    def __init__(self, name: str, engines: list[Engine]) -> None:
        manifests = [e.manifest for e in engines]
        first = manifests[0]
        for m in manifests[1:]:
            if m.classes != first.classes:
                raise ValueError(f"{name}: {first.student} and {m.student} were trained on different classes")
        self.name, self.engines = name, engines
        self.labels_io = len(engines) == 1 and engines[0].entry.io == "labels"
        self.classes, self.palette = first.classes, np.array(first.palette, dtype=np.uint8)
        self.mean = np.array(first.preprocess["mean"], dtype=np.float32) * first.preprocess.get("scale", 255)
        self.std = np.array(first.preprocess["std"], dtype=np.float32) * first.preprocess.get("scale", 255)
        self.multiple = max(m.preprocess.get("size_multiple", 1) for m in manifests)
        self.min_hw = tuple(max(m.shapes["min"][i] for m in manifests) for i in (1, 2))
        self.max_hw = tuple(min(m.shapes["max"][i] for m in manifests) for i in (1, 2))
        self.max_batch = min(m.shapes["max"][0] for m in manifests)

    def fit(self, height: int, width: int) -> tuple[int, int]:
        """The size an image runs at: scaled (aspect kept) into [min, max], on the size multiple."""
        scale = min(1.0, self.max_hw[0] / height, self.max_hw[1] / width)
        scale = max(scale, self.min_hw[0] / height, self.min_hw[1] / width)
        size = []
        for side, low, high in zip((height, width), self.min_hw, self.max_hw, strict=True):
            side = round(side * scale / self.multiple) * self.multiple
            size.append(min(max(side, low), high))
        return size[0], size[1]

    def predict(self, image: np.ndarray) -> Prediction:
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[np.ndarray]) -> list[Prediction]:
        """Images of one fitted size share batches (up to the engines' max batch)."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            groups[self.fit(*image.shape[:2])].append(i)
        results: list[Prediction | None] = [None] * len(images)
        for size, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                for i, prediction in zip(chunk, self.run_batch([images[i] for i in chunk], size), strict=True):
                    results[i] = prediction
        return results  # type: ignore[return-value]

    def run_batch(self, images: list[np.ndarray], size: tuple[int, int]) -> list[Prediction]:
        """One engine call on `images` resized to `size` (no fitting, no batch limit: the engines
        must accept that shape; the benchmarks call this at sizes they choose)."""
        t0 = time.perf_counter()
        batch = np.stack([_resize(image, size, Image.BILINEAR) for image in images])
        if not self.labels_io:
            batch = ((batch.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        t1 = time.perf_counter()
        outputs = [engine.run(batch) for engine in self.engines]
        t2 = time.perf_counter()
        if self.labels_io:
            labels = outputs[0]
        else:
            labels = np.mean([_softmax(o) for o in outputs], axis=0).argmax(1).astype(np.uint8)
        labels = [_resize(lab, image.shape[:2], Image.NEAREST) for lab, image in zip(labels, images, strict=True)]
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        return [Prediction(lab, dict(timings), len(images)) for lab in labels]

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        return self.palette[np.minimum(labels, len(self.palette) - 1)]


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if array.shape[:2] == tuple(size):
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def engines_of(model: str) -> tuple[tuple[str, ...], str]:
    """The students a model runs and their I/O mode: the ensemble needs both students' logits."""
    return (STUDENTS, "logits") if model == "ensemble" else ((model,), "labels")


def engine_dirs(engines_root: str | Path) -> dict[str, Path]:
    """The students exported under `engines_root` (a run's export dir: <root>/<student>/manifest.json)."""
    root = Path(engines_root)
    found = {s: root / s for s in STUDENTS if (root / s / MANIFEST_FILE).is_file()}
    if not found:
        raise FileNotFoundError(f"no engine dirs under {root} (expected {root}/cnn/{MANIFEST_FILE} or vit/)")
    return found


def choices(engines_root: str | Path, backends: tuple[str, ...] = BACKENDS) -> list[tuple[str, str, str]]:
    """Every (model, variant, backend) that `load_segmenter` can open from these engine dirs."""
    manifests = {s: read_manifest(d) for s, d in engine_dirs(engines_root).items()}
    fmt = {"onnxruntime": "onnx", "tensorrt": "plan", "openvino": "openvino"}
    have = {(s, e.variant, e.io, e.format) for s, m in manifests.items() for e in m.engines}
    found = []
    for backend in backends:
        variants = sorted({v for (_, v, _, f) in have if f == fmt[backend]}, key=_variant_order)
        for variant in variants:
            for model in MODELS:
                members, io = engines_of(model)
                if all((s, variant, io, fmt[backend]) in have for s in members):
                    found.append((model, variant, backend))
    return found


def _variant_order(variant: str) -> int:
    order = ("fp32", "bf16", "fp16", "int8.cpu", "int8.qdq")
    return order.index(variant) if variant in order else len(order)


def load_segmenter(
    engines_root: str | Path,
    model: str = "cnn",
    variant: str = "fp32",
    backend: str = "onnxruntime",
    device: str = "auto",
    threads: int = 0,
) -> Segmenter:
    """`engines_root`: a run's export dir (any model, variant, backend), or one exported ONNX file alone
    (its own student, precision and I/O mode: `model` and `variant` are taken from the file)."""
    if Path(engines_root).suffix == ".onnx":
        engine = open_engine(engines_root, backend=backend, device=device, threads=threads)
        return Segmenter(engine.manifest.student, [engine])
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}' ({', '.join(MODELS)})")
    dirs = engine_dirs(engines_root)
    members, io = engines_of(model)
    missing = [s for s in members if s not in dirs]
    if missing:
        raise FileNotFoundError(f"{model} needs the {', '.join(missing)} engine dir under {engines_root}")
    engines = [open_engine(dirs[s], variant, io, backend, device, threads) for s in members]
    return Segmenter(model, engines)


def usable_backends() -> tuple[str, ...]:
    """ONNX Runtime always; OpenVINO where it imports; native TensorRT where tensorrt and pycuda import."""
    usable = ["onnxruntime"]
    if importlib.util.find_spec("openvino") is not None:
        usable.append("openvino")
    if all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda")):
        usable.append("tensorrt")
    return tuple(usable)


def timed_segmenters(
    engines_root: str | Path, model: str, variant: str | None = None, backend: str | None = None, runs: int = 3
) -> dict[tuple[str, str], tuple[Segmenter, float]]:
    """Every gated engine of `model` this host runs (optionally of one variant or backend), opened, warmed
    up and timed at the engines' serving size: {(variant, backend): (segmenter, median ms)}."""
    members, _ = engines_of(model)
    h, w = read_manifest(engine_dirs(engines_root)[members[0]]).shapes["opt"][1:]
    image = np.zeros((h, w, 3), np.uint8)
    found = {}
    for m, v, b in choices(engines_root, usable_backends()):
        if m != model or (variant and v != variant) or (backend and b != backend):
            continue
        try:
            segmenter = load_segmenter(engines_root, model, v, b)
            segmenter.predict(image)  # warm-up: first-call allocations and compilation
        except (RuntimeError, ValueError, OSError) as e:  # e.g. a precision this CPU lacks: not a candidate
            log.warning("%s %s on %s cannot run here: %s", model, v, b, e)
            continue
        found[(v, b)] = segmenter, median_ms(segmenter.predict, image, min_runs=runs)
    if not found:
        raise FileNotFoundError(f"{engines_root}: no {model} engine this host can run")
    return found


def fastest(
    engines_root: str | Path, model: str, variant: str | None = None, backend: str | None = None, runs: int = 3
) -> tuple[str, str, dict[tuple[str, str], float]]:
    """The quickest gated engine of `model` this host runs (optionally of one variant or backend), timed
    at the engines' serving size: (variant, backend, median ms of every engine that opened). Measured,
    not guessed: which precision and backend wins depends on the CPU or GPU and on the model."""
    times = {key: ms for key, (_, ms) in timed_segmenters(engines_root, model, variant, backend, runs).items()}
    best = min(times, key=times.get)
    return best[0], best[1], times


def describe_choice(model: str, variant: str, backend: str, times: dict[tuple[str, str], float]) -> str:
    others = ", ".join(f"{v} on {b} {ms:.1f} ms" for (v, b), ms in sorted(times.items(), key=lambda kv: kv[1]))
    return f"{model} {variant} on {backend}, the fastest gated engine here ({others})"
