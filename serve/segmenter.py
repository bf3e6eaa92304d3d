"""One interface over the engines: `predict(image) -> Prediction` (class map + stage timings).

A model is a student's `labels` engine (uint8 image in, class map out: argmax inside the graph),
or the ensemble of both students: the mean of their softmax, from their `logits` engines. Images
of any size are fitted into the engines' shape range (aspect kept), and the class map comes back
at the image's own size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from serve.backends import BACKENDS, RUNTIMES, Backend, backend_named, legacy, usable
from serve.host import cpu_model
from serve.manifest import MANIFEST_FILE, read_manifest
from serve.runtime import Engine, median_ms, open_backend, open_engine

log = logging.getLogger(__name__)

STUDENTS = ("cnn", "vit")
MODELS = (*STUDENTS, "ensemble")
CHOICE_FILE = ".engine-choice.json"  # per host and model: the engine `auto` picked by timing, kept for later runs


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) uint8 class indices at the input image's size
    timings: dict[str, float] = field(default_factory=dict)  # ms per stage, of the batch it ran in
    batch: int = 1
    confidence: np.ndarray | None = None  # (H, W) float32 probability of the chosen class (logits engines only)
    windows: int = 1  # engine inputs this image took (sliding window: its windows)


class Segmenter:
    def __init__(self, name: str, engines: list[Engine], backend: str | None = None) -> None:
        manifests = [e.manifest for e in engines]
        first = manifests[0]
        for m in manifests[1:]:
            if m.classes != first.classes:
                raise ValueError(f"{name}: {first.student} and {m.student} were trained on different classes")
        self.name, self.engines, self.backend = name, engines, backend
        self.labels_io = len(engines) == 1 and engines[0].entry.io == "labels"
        self.classes, self.palette = first.classes, np.array(first.palette, dtype=np.uint8)
        self.mean = np.array(first.preprocess["mean"], dtype=np.float32) * first.preprocess.get("scale", 255)
        self.std = np.array(first.preprocess["std"], dtype=np.float32) * first.preprocess.get("scale", 255)
        self.multiple = max(m.preprocess.get("size_multiple", 1) for m in manifests)
        self.min_hw = tuple(max(m.shapes["min"][i] for m in manifests) for i in (1, 2))
        self.max_hw = tuple(min(m.shapes["max"][i] for m in manifests) for i in (1, 2))
        self.max_batch = min(m.shapes["max"][0] for m in manifests)
        self.opt_hw = tuple(first.shapes["opt"][1:])  # the serving size the engines were tuned for
        # engines the gate passed at some sizes only: other sizes go to `fallback` (load_segmenter opens it)
        self.narrowed = [e.entry.profile for e in engines if e.entry is not None and e.entry.profile]
        self.fallback: Segmenter | None = None
        self._fell_back: set[tuple[int, int]] = set()

    def accepts(self, size: tuple[int, int]) -> bool:
        """Whether every engine passed its gate at this input size (not: an engine narrowed to other sizes)."""
        h, w = size
        return all(p["min"][1] <= h <= p["max"][1] and p["min"][2] <= w <= p["max"][2] for p in self.narrowed)

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
        must accept that shape; the benchmarks call this at sizes they choose). A size an engine was not gated at
        runs on the fallback engine."""
        if not self.accepts(size):
            if self.fallback is None:
                raise ValueError(f"{self.name}: no engine gated at {size[0]}x{size[1]} and no fallback engine")
            if size not in self._fell_back:  # said once per size
                self._fell_back.add(size)
                log.info("%s: %dx%d is outside the sizes its engine passed the gate at: it runs on %s", self.name,
                         *size, self.fallback.backend)  # fmt: skip
            return self.fallback.run_batch(images, size)
        t0 = time.perf_counter()
        batch = np.stack([resize(image, size, Image.BILINEAR) for image in images])
        if not self.labels_io:
            batch = ((batch.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        t1 = time.perf_counter()
        outputs = [engine.run(batch) for engine in self.engines]
        t2 = time.perf_counter()
        if self.labels_io:
            labels, confidence = outputs[0], [None] * len(images)
        else:
            probs = np.mean([softmax(o) for o in outputs], axis=0)
            labels, confidence = probs.argmax(1).astype(np.uint8), probs.max(1)
        sizes = [image.shape[:2] for image in images]
        labels = [resize(lab, hw, Image.NEAREST) for lab, hw in zip(labels, sizes, strict=True)]
        confidence = [
            c if c is None else resize(c, hw, Image.BILINEAR) for c, hw in zip(confidence, sizes, strict=True)
        ]
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "inference": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        return [Prediction(lab, dict(timings), len(images), c) for lab, c in zip(labels, confidence, strict=True)]

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        return self.palette[np.minimum(labels, len(self.palette) - 1)]


def resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    if array.shape[:2] == tuple(size):
        return array
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def engines_of(model: str, scores: bool = False) -> tuple[tuple[str, ...], str]:
    """The students a model runs and their I/O mode: the ensemble needs both students' logits, and so does any
    model whose class scores are wanted (`scores`: a sliding window, a confidence map)."""
    members = STUDENTS if model == "ensemble" else (model,)
    return members, "logits" if scores or model == "ensemble" else "labels"


def engine_dirs(engines_root: str | Path) -> dict[str, Path]:
    """The students exported under `engines_root` (a run's export dir: <root>/<student>/manifest.json)."""
    root = Path(engines_root)
    found = {s: root / s for s in STUDENTS if (root / s / MANIFEST_FILE).is_file()}
    if not found:
        raise FileNotFoundError(f"no engine dirs under {root} (expected {root}/cnn/{MANIFEST_FILE} or vit/)")
    return found


def choices(engines_root: str | Path, backends: list[Backend] | None = None) -> list[tuple[str, Backend]]:
    """Every (model, backend) that `load_segmenter` can open from these engine dirs (of `backends`, by
    default every row of the table), in the table's order."""
    manifests = {s: read_manifest(d) for s, d in engine_dirs(engines_root).items()}
    found = []
    for backend in BACKENDS.values() if backends is None else backends:
        for model in MODELS:
            members, io = engines_of(model)
            if all(
                s in manifests and manifests[s].first(backend.runtime, backend.precision, backend.variants, io)
                for s in members
            ):
                found.append((model, backend))
    return found


def load_segmenter(
    engines_root: str | Path,
    model: str = "cnn",
    backend: str | Backend = "ort.cpu.fp32",
    threads: int = 0,
    variant: str | None = None,
    scores: bool = False,
) -> Segmenter:
    """`engines_root`: a run's export dir, or one exported ONNX file alone (its own student, precision and I/O
    mode: `model` is taken from the file, and an ONNX Runtime backend's device is used). `variant` pins one of
    the backend's graph variants; `scores` opens the logits engines (class scores: sliding window, confidence)."""
    row = backend if isinstance(backend, Backend) else backend_named(backend)
    if Path(engines_root).suffix == ".onnx":
        if row.runtime != "onnxruntime":
            raise ValueError(f"{engines_root}: a lone ONNX file runs on an ort.* backend, not {row.name}")
        engine = open_engine(engines_root, backend="onnxruntime", device=row.device, threads=threads)
        return Segmenter(engine.manifest.student, [engine])
    if model not in MODELS:
        raise ValueError(f"unknown model '{model}' ({', '.join(MODELS)})")
    dirs = engine_dirs(engines_root)
    members, io = engines_of(model, scores)
    missing = [s for s in members if s not in dirs]
    if missing:
        raise FileNotFoundError(f"{model} needs the {', '.join(missing)} engine dir under {engines_root}")
    segmenter = Segmenter(model, [open_backend(dirs[s], row, io, threads, variant) for s in members], row.name)
    if segmenter.narrowed:
        segmenter.fallback = load_segmenter(engines_root, model, fallback_for(row), threads, scores=scores)
    return segmenter


def fallback_for(row: Backend) -> Backend:
    """Where a request outside an engine's narrowed profile runs: the same runtime and device at fp32, else ONNX
    Runtime fp32 on that device (the gate's reference engine: it passes at every size or nothing ships)."""
    fp32 = [b for b in BACKENDS.values() if b.precision == "fp32" and b.device == row.device and b is not row]
    fp32.sort(key=lambda b: (b.runtime != row.runtime, b.runtime != "onnxruntime"))
    return fp32[0]


def timed_segmenters(
    engines_root: str | Path, model: str, backends: list[str] | None = None, runs: int = 3, scores: bool = False
) -> dict[str, tuple[Segmenter, float]]:
    """Every gated engine of `model` this host runs (or those of some backends), opened, warmed up and timed at
    the engines' serving size: {backend name: (segmenter, median ms)}."""
    members, _ = engines_of(model)
    h, w = read_manifest(engine_dirs(engines_root)[members[0]]).shapes["opt"][1:]
    image = np.zeros((h, w, 3), np.uint8)
    found = {}
    for m, row in choices(engines_root, usable()):
        if m != model or (backends is not None and row.name not in backends):
            continue
        try:
            segmenter = load_segmenter(engines_root, model, row, scores=scores)
            segmenter.predict(image)  # warm-up: first-call allocations and compilation
        except (RuntimeError, ValueError, OSError) as e:  # e.g. a precision this CPU lacks: not a candidate
            log.warning("%s on %s cannot run here: %s", model, row.name, e)
            continue
        found[row.name] = segmenter, median_ms(segmenter.predict, image, min_runs=runs)
    if not found:
        raise FileNotFoundError(f"{engines_root}: no {model} engine this host can run")
    return found


def fastest(
    engines_root: str | Path, model: str, backends: list[str] | None = None, runs: int = 3
) -> tuple[str, dict[str, float]]:
    """The quickest gated engine of `model` this host runs, timed at the engines' serving size: (its backend,
    median ms of every engine that opened). Measured, not guessed: which precision and runtime wins depends
    on the CPU or GPU and on the model."""
    times = {name: ms for name, (_, ms) in timed_segmenters(engines_root, model, backends, runs).items()}
    return min(times, key=times.get), times


def select(
    engines_root: str | Path, model: str, backend: str = "auto", variant: str = "auto", device: str = "auto"
) -> tuple[Backend, str | None, str | None]:
    """The engine a command asked for, as (backend row, pinned graph variant, how it was chosen). `backend`: a
    row's name, `auto` (the fastest gated engine here, by `auto_choice`), or, as in earlier versions, a runtime
    name; `variant` and `device` (ONNX Runtime's provider) narrow a runtime name or `auto` as the old flags did."""
    pin = None if variant in ("auto", "bf16") else variant
    if backend in BACKENDS or backend not in ("auto", *RUNTIMES):  # a row, or a name that is none (refused)
        return backend_named(backend), pin, None
    if Path(engines_root).suffix == ".onnx":  # a lone ONNX file: ONNX Runtime on the device asked for
        return legacy(pin or "fp32", "onnxruntime", device), None, None
    if backend != "auto" and variant != "auto":
        return legacy(variant, backend, device), pin, None
    rows = [r for m, r in choices(engines_root, usable()) if m == model and backend in ("auto", r.runtime)]
    if variant != "auto":
        bf16 = variant == "bf16"  # OpenVINO's bf16: the fp32 graph at bf16
        rows = [r for r in rows if (r.precision == "bf16" if bf16 else variant in r.variants and r.precision != "bf16")]
    if not rows:
        raise FileNotFoundError(
            f"{engines_root}: no {model} engine this host runs for --backend {backend} --variant {variant}"
        )
    chosen, times, how = auto_choice(engines_root, model, rows)
    return BACKENDS[chosen], pin, describe_choice(model, chosen, times) + f"; {how}"


def recorded_times(engines_root: str | Path, model: str, rows: list[Backend]) -> dict[str, float] | None:
    """The export's timings of these backends for `model` (summed over its students), where the export ran on
    this CPU and timed every one of them; else None."""
    dirs = engine_dirs(engines_root)
    members, _ = engines_of(model)
    manifests = [read_manifest(dirs[m]) for m in members if m in dirs]
    recorded = [m.timings for m in manifests if m.timings.get("cpu") == cpu_model()]
    if len(recorded) < len(members) or any(r.name not in t["ms"] for t in recorded for r in rows):
        return None
    return {r.name: sum(t["ms"][r.name] for t in recorded) for r in rows}


def auto_choice(engines_root: str | Path, model: str, rows: list[Backend]) -> tuple[str, dict[str, float], str]:
    """The fastest of `rows`, the same on every run: by the export's timings where it ran on this CPU and timed
    them all; else by this host's own timing, taken once and kept in CHOICE_FILE beside the engine dirs."""
    if times := recorded_times(engines_root, model, rows):
        return min(times, key=times.get), times, "timed at export on this CPU"
    path = Path(engines_root) / CHOICE_FILE
    exported = hashlib.sha256(b"".join((d / MANIFEST_FILE).read_bytes() for d in engine_dirs(engines_root).values()))
    key = " | ".join([cpu_model(), exported.hexdigest()[:12], model, *sorted(r.name for r in rows)])
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if key in saved:
        return saved[key]["backend"], saved[key]["times"], f"timed on this host before ({path})"
    chosen, times = fastest(engines_root, model, [r.name for r in rows])
    try:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**saved, key: {"backend": chosen, "times": times}}, indent=1))
        os.replace(tmp, path)
        return chosen, times, f"timed now, kept in {path} for the next runs"
    except OSError as e:  # a read-only engine dir: the choice holds for this run only
        return chosen, times, f"timed now (not kept: {e})"


def describe_choice(model: str, backend: str, times: dict[str, float]) -> str:
    others = ", ".join(f"{b} {ms:.1f} ms" for b, ms in sorted(times.items(), key=lambda kv: kv[1]))
    return f"{model} on {backend}, the fastest gated engine here ({others})"
