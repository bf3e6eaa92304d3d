"""Latency, throughput, memory and accuracy of every engine of a run, against its PyTorch students.

python -m benchmarks.bench --run runs/<name> [--models cnn vit ensemble] [--backends ...]
    [--batch-sizes 1 4 16] [--sizes 64x64 512x1024] [--seconds 3] [--min-runs 10] [--warmup 0.2]
    [--eval-images 50] [--threads 0] [--rounds 1] [--out RUN/bench]

Every configuration (model x backend x batch size x input size) is timed end to end, uint8 RGB
images on the host in, class maps on the host out, after a time-based warm-up and over a time
budget; on GPU the model call alone is also timed with CUDA events (`compute_*`). Speed-ups are
ratios to PyTorch eager fp32 of the same model, batch and size, measured in the same run; with
`--rounds N` each point times every backend in turn, N times, so the two are measured seconds apart. Each
(model, backend) is also scored on the eval split: mIoU next to the PyTorch student's, and the
share of pixels whose class agrees with it. A backend that fails is recorded with its error and
the others go on. Writes results.json, report.md, pareto.png and latency_vs_batch.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from benchmarks.hardware import cpu_model, gemm_peaks
from benchmarks.report import write_plots, write_report
from export.graphs import LogitsModel
from export.parity import Runner, memoised
from serve.backends import BACKENDS, RUNTIMES, usable
from serve.manifest import read_manifest, sizes_text
from serve.segmenter import STUDENTS, engines_of, load_segmenter
from serve.slide import Sliding, boxes, default_stride, slide, sliding
from train.data import build_dataset
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.metrics import ConfusionMatrix, class_map
from train.run_dir import load_run_config, load_student, weights_file

log = logging.getLogger(__name__)

SCHEMA = 1
BASELINE = "torch"
MODELS = (*STUDENTS, "ensemble")
# The PyTorch rows every engine is compared with (name -> precision, whether it needs CUDA); the engines'
# rows are serve.backends.BACKENDS.
TORCH = {
    "torch": ("fp32", False),
    "torch.compile": ("fp32", False),
    "torch.fp16": ("fp16", True),
    "torch.bf16": ("bf16", True),
    "torch.cudagraphs": ("fp32", True),
}
COMPILED = ("torch.compile", "torch.cudagraphs")
ROWS_FILE = "rows.jsonl"  # one JSON line per row, written as it is measured (results.json: all of them, at the end)


def precision_of(backend: str) -> str:
    return TORCH[backend][0] if backend in TORCH else BACKENDS[backend].precision


def default_backends(cuda: bool) -> list[str]:
    """What this machine can run: the PyTorch rows (GPU ones on a GPU host) and every engine backend whose
    runtime, device and precision this host has."""
    return [name for name, (_, gpu) in TORCH.items() if cuda or not gpu] + [b.name for b in usable()]


class TorchRunner:
    """The PyTorch student(s) on the same contract as an engine: uint8 NHWC in, class map out."""

    def __init__(
        self,
        students: list[torch.nn.Module],
        backend: str,
        device: torch.device,
        sliding: Sliding | None = None,
        window_batch: int = 1,
    ) -> None:
        self.device, self.backend, self.sliding, self.window_batch = device, backend, sliding, window_batch
        self.models = [LogitsModel(s).eval().to(device) for s in students]
        # On CUDA, NHWC as in training (cuDNN's fast kernels); uint8 NHWC input permuted is NHWC already.
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.models = [m.to(memory_format=self.memory_format) for m in self.models]
        if backend in COMPILED:
            # Every row compiles the same code object (LogitsModel.forward): without a reset, dynamo's
            # recompile limit (8) is reached after a few rows and the rest run eager under a compiled label
            # (seen on an H100: the ViT's compiled rows after the CNN's). Hitting it anyway fails the row.
            torch._dynamo.reset()
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        if backend == "torch.compile":
            self.models = [torch.compile(m) for m in self.models]
        elif backend == "torch.cudagraphs":
            self.models = [torch.compile(m, mode="reduce-overhead") for m in self.models]
        self.autocast = {"torch.fp16": torch.float16, "torch.bf16": torch.bfloat16}.get(backend)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.x: torch.Tensor | None = None

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            outs = [m(x) if self.sliding is None else self._slid(m, x) for m in self.models]
        if len(outs) == 1:
            return outs[0]
        return torch.stack([F.softmax(o.float(), 1) for o in outs]).mean(0)

    def _slid(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A model's logits averaged over the windows serve.slide takes (training's eval.mode=slide), batched
        `window_batch` windows a call as serve.slide batches them."""
        cells = boxes(x.shape[-2], x.shape[-1], self.sliding)
        total, count = None, x.new_zeros(1, 1, *x.shape[-2:])
        for first in range(0, len(cells), self.window_batch):
            chunk = cells[first : first + self.window_batch]
            windows = torch.cat([x[..., top : top + h, left : left + w] for top, left, h, w in chunk])
            logits = model(windows).float().unflatten(0, (len(chunk), x.shape[0]))
            total = x.new_zeros(x.shape[0], logits.shape[2], *x.shape[-2:]) if total is None else total
            for (top, left, h, w), scores in zip(chunk, logits, strict=True):
                total[..., top : top + h, left : left + w] += scores
                count[..., top : top + h, left : left + w] += 1
        return total / count

    def _normalised(self, images: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(images if images.flags.writeable else images.copy()).to(self.device)
        return (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        labels = class_map(self.logits(self._normalised(images))).to(torch.uint8)
        return labels.cpu().numpy()

    def prepare(self, images: np.ndarray) -> None:
        self.x = self._normalised(images).contiguous(memory_format=self.memory_format)

    def accepts(self, size: tuple[int, int]) -> bool:
        return True

    def compute(self) -> None:
        self.logits(self.x)


class NotShipped(Exception):
    """The export left this engine out (its parity or its int8 rule): the row says why, it did not fail."""


class EngineRunner:
    """A backend's engines (serve.backends.BACKENDS) behind serve's Segmenter (no fitting, any batch)."""

    def __init__(self, engines: Path, model: str, backend: str, threads: int, slide_it: bool = False) -> None:
        row = BACKENDS[backend]
        members, io = engines_of(model, slide_it)
        for member in members:
            manifest = read_manifest(engines / member)
            missing = manifest.first(row.runtime, row.precision, row.variants, io) is None
            if missing and (why := manifest.left_out(row.runtime, row.precision, row.variants)):
                raise NotShipped(f"{member} {backend}: {why}")
        self.segmenter = load_segmenter(engines, model, row, threads, scores=slide_it)
        self.sliding = sliding(self.segmenter) if slide_it else None
        self.entries = [e.entry for e in self.segmenter.engines]
        self.backend, self.variant = backend, self.entries[0].variant

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.sliding is not None:
            return np.stack([slide(self.segmenter, image, self.sliding).labels for image in images])
        return np.stack([p.labels for p in self.segmenter.run_batch(list(images), images.shape[1:3])])

    def accepts(self, size: tuple[int, int]) -> bool:
        """Whether its engines were gated at this input size (slide rows: windows of the serving size)."""
        return self.sliding is not None or self.segmenter.accepts(size)

    def outside(self, size: tuple[int, int]) -> str:
        """Why a size is not this backend's: its engines' narrowed profiles, and the engine that runs it."""
        fitted = ", ".join(sizes_text(p) for p in self.segmenter.narrowed)
        fallback = self.segmenter.fallback.backend
        return f"gated at {fitted} only (the gate narrowed its profile): {size[0]}x{size[1]} runs on {fallback}"

    @property
    def file_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)

    @property
    def build_s(self) -> float:
        return sum(e.build_s for e in self.entries)


@dataclass
class Timing:
    samples_ms: list[float]

    def summary(self, prefix: str = "") -> dict:
        s = np.array(self.samples_ms)
        return {
            f"{prefix}mean_ms": float(s.mean()),
            f"{prefix}p50_ms": float(np.percentile(s, 50)),
            f"{prefix}p90_ms": float(np.percentile(s, 90)),
            f"{prefix}p99_ms": float(np.percentile(s, 99)),
            f"{prefix}min_ms": float(s.min()),
            f"{prefix}cv": float(s.std() / s.mean()) if s.mean() > 0 else 0.0,
            f"{prefix}runs": len(s),
        }


def time_it(fn, warmup_s: float, seconds: float, min_runs: int, sync=lambda: None) -> tuple[Timing, float]:
    """Time-based warm-up, then runs until both the time budget and the run count are met.
    Returns the timing and the first call's duration (compilation, engine set-up)."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        fn()
    sync()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < min_runs:
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(1e3 * (time.perf_counter() - t0))
    return Timing(samples), first


def time_cuda(fn, warmup_s: float, seconds: float, min_runs: int) -> Timing:
    """GPU time of `fn` alone, from CUDA events (the host may run ahead; events do not)."""
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < min_runs:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return Timing(samples)


def accuracy(runner, reference, eval_set, count: int, num_classes: int, size: tuple[int, int] | None = None) -> dict:
    """mIoU of `runner` and of `reference` (the PyTorch student) on the first eval images, batch 1,
    and the share of pixels on which they agree; with `size`, on the images (and labels) resized to it,
    so that a reduced precision's accuracy is measured at the size it is timed at."""
    ours, theirs = ConfusionMatrix(num_classes), ConfusionMatrix(num_classes)
    same = total = 0
    first_call_s = None
    for i in range(min(count, len(eval_set))):
        image, mask = eval_set.read(i)
        if size is not None and image.shape[:2] != tuple(size):
            image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))
        started = time.perf_counter()
        a = runner(image[None])[0]
        first_call_s = first_call_s if first_call_s is not None else time.perf_counter() - started
        b = reference(image[None])[0]
        target = torch.from_numpy(np.ascontiguousarray(mask).copy())
        ours.update(torch.from_numpy(a), target)
        theirs.update(torch.from_numpy(b), target)
        same += int((a == b).sum())
        total += a.size
    miou, miou_torch = ours.compute()["miou"], theirs.compute()["miou"]
    return {"miou": miou, "miou_torch": miou_torch, "delta_miou": miou - miou_torch, "agreement": same / total,
            "first_call_s": first_call_s}  # fmt: skip


def model_gflop(models: list[torch.nn.Module], size: tuple[int, int]) -> float:
    """GFLOP of one image through the model(s) (convolutions and matrix products: what the kernels do)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for m in models:
            LogitsModel(m).eval()(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9


def machine(cuda: bool) -> dict:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if cuda else None}
    info["device"] = info["gpu"] or info["cpu"]
    return info


def versions() -> dict:
    """Python, torch and each runtime of the backend table (None where it is not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for runtime in RUNTIMES:
        try:
            out[runtime] = importlib.import_module(runtime).__version__.split("-")[0]
        except ImportError:
            out[runtime] = None
    return out


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size '{text}' is not HxW, e.g. 512x1024") from None
    return h, w


@dataclass
class Settings:
    models: list[str]
    backends: list[str]
    batch_sizes: list[int]
    sizes: list[tuple[int, int]]
    seconds: float = 3.0
    min_runs: int = 10
    warmup: float = 0.2
    eval_images: int = 50
    threads: int = 0
    rounds: int = 1
    modes: list[str] = field(default_factory=lambda: ["fitted"])  # fitted; slide: windows of the serving size


@dataclass
class Bench:
    """What every row of one bench shares: the run, its students and eval images, the settings and the host."""

    run_dir: Path
    settings: Settings
    cfg: object  # train.config.Config
    students: dict
    eval_set: object
    device: torch.device
    meta: dict
    gflop: dict
    points: list
    bar: tqdm
    rows_file: Path  # each row appended as soon as it is measured: a run cut off still returns what it measured
    window: Sliding | None = None  # the engines' sliding windows (slide rows)
    window_batch: int = 1  # windows per call in slide rows: the engines' max batch, for PyTorch too

    def done(self, row: dict) -> dict:
        with self.rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.bar.update()
        return row

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def present_students(run_dir: Path) -> list[str]:
    """The students the run has PyTorch weights for (an import from transformers holds the vit alone)."""
    return [s for s in STUDENTS if weights_file(run_dir, s).is_file()]


def run_models(run_dir: Path, asked: list[str] | None) -> list[str]:
    """The models to bench: `asked`, else every student with weights and their ensemble when both are there.
    Raises ValueError naming what the run lacks (an imported ONNX graph has no PyTorch student to compare with)."""
    have = present_students(run_dir)
    exported = [s for s in STUDENTS if (run_dir / "export" / s).exists()] or list(STUDENTS)
    models = asked or [*have, *(["ensemble"] if len(have) == len(STUDENTS) else [])] or exported
    for model in models:
        if missing := [s for s in (STUDENTS if model == "ensemble" else (model,)) if s not in have]:
            graph = run_dir / f"{missing[0]}.onnx"
            why = (
                f"{graph} is an imported ONNX graph: no PyTorch student for the bench's baseline and accuracy "
                f"(its engines were gated against it at export: {run_dir / 'export' / missing[0] / 'parity.json'})"
                if graph.is_file()
                else f"{run_dir} has no {weights_file(run_dir, missing[0]).name}"
            )
            raise ValueError(f"cannot bench {model}: {why}")
    return models


def run_bench(run_dir: Path, settings: Settings, out: Path, command: str = "") -> dict:
    cfg = load_run_config(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    students = {s: load_student(run_dir, s, cfg) for s in present_students(run_dir)}
    threads = {"torch": torch.get_num_threads(), "onnxruntime": settings.threads or "default (one per physical core)"}
    meta = {"machine": machine(device.type == "cuda"), "versions": versions(), "threads": threads}
    meta["gemm_peak_gflops"] = None if device.type == "cuda" else gemm_peaks()
    points = [(bs, hw) for hw in settings.sizes for bs in settings.batch_sizes]
    configs = len(settings.models) * len(settings.backends) * len(points) * len(settings.modes)
    bar = tqdm(total=configs, desc="bench", unit="config")
    eval_set = build_dataset(cfg.data, cfg.data.eval_split, train=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / ROWS_FILE).write_text("")
    window, window_batch = None, 1
    if "slide" in settings.modes:  # windows of the engines' serving size, for the PyTorch rows too
        shapes = read_manifest(run_dir / "export" / next(iter(students))).shapes
        opt, window_batch = shapes["opt"][1:], shapes["max"][0]
        window = Sliding(tuple(opt), default_stride(opt))
    sizes = settings.sizes + ([window.window] if window else [])  # a slide row's work: its windows
    gflop = {(m, hw): model_gflop([students[s] for s in (STUDENTS if m == "ensemble" else (m,))], hw)
             for m in settings.models for hw in sizes}  # fmt: skip
    bench = Bench(run_dir, settings, cfg, students, eval_set, device, meta, gflop, points, bar, out / ROWS_FILE,
                  window, window_batch)  # fmt: skip
    rows = [row for model in settings.models for mode in settings.modes for row in _model_rows(bench, model, mode)]
    bar.close()
    point = lambda r: (r["model"], r["mode"], r["batch"], r["height"], r["width"])  # noqa: E731
    baseline = {point(r): r["mean_ms"] for r in rows if r["backend"] == BASELINE and r["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            ref = baseline.get(point(row))
            row["speedup"] = ref / row["mean_ms"] if ref else None

    def order(r: dict) -> tuple:
        point = (r["batch"], (r["height"], r["width"]))
        return settings.models.index(r["model"]), settings.modes.index(r["mode"]), settings.backends.index(
            r["backend"]), points.index(point)  # fmt: skip

    rows.sort(key=order)
    recorded = {**settings.__dict__, "sizes": [list(s) for s in settings.sizes]}
    result = {"schema": SCHEMA, "run": str(run_dir), "command": command, **meta, "settings": recorded, "results": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out / "report.md")
    write_plots(result, out)
    return result


def _model_rows(bench: Bench, model: str, mode: str) -> list[dict]:
    """Every backend's rows for one model in one mode: each opened and scored once, then timed at every point."""
    members = STUDENTS if model == "ensemble" else (model,)
    window = bench.window if mode == "slide" else None
    reference = TorchRunner([bench.students[s] for s in members], BASELINE, bench.device, window, bench.window_batch)
    reference = memoised(reference)  # every backend is scored against it on the same images: each runs once
    rows, ready = [], {}  # ready: backend -> its runner and the row fields every point shares
    for backend in bench.settings.backends:
        base = {"model": model, "backend": backend, "precision": precision_of(backend), "mode": mode}
        base["device"] = bench.meta["machine"]["device"]
        try:
            shared = _open(bench, model, backend, members, reference, window)
        except Exception as e:  # the whole backend is unusable here: one failed row per point
            status = "not shipped" if isinstance(e, NotShipped) else "failed"
            for batch, (h, w) in bench.points:
                row = {**base, "batch": batch, "height": h, "width": w, "status": status, "error": _why(e)}
                rows.append(bench.done(row))
            continue
        shared["base"] = {**base, **shared.pop("base")}
        if backend in COMPILED:  # each resets dynamo, which would undo another's compilation: timed alone
            rows += _time_points(bench, model, {backend: shared}, 1)
        else:
            ready[backend] = shared
    return rows + _time_points(bench, model, ready, bench.settings.rounds)


def _open(bench: Bench, model: str, backend: str, members: tuple, reference: Runner, window) -> dict:
    """A backend's runner, its files' size and build time, and its accuracy at every size."""
    s = bench.settings
    if backend in TORCH:
        runner = TorchRunner([bench.students[m] for m in members], backend, bench.device, window, bench.window_batch)
        file_bytes, build_s, base = sum(weights_file(bench.run_dir, m).stat().st_size for m in members), None, {}
    else:
        runner = EngineRunner(bench.run_dir / "export", model, backend, s.threads, window is not None)
        file_bytes, build_s, base = runner.file_bytes, runner.build_s, {"variant": runner.variant}
    num_classes = bench.cfg.data.num_classes
    sizes = [hw for hw in s.sizes if runner.accepts(hw)]  # a narrowed engine: the sizes it was gated at
    scores = {hw: accuracy(runner, reference, bench.eval_set, s.eval_images, num_classes, hw) for hw in sizes}
    if backend in COMPILED:  # compilation happens in the first call, here at the first size
        build_s = scores[s.sizes[0]]["first_call_s"]
    for score in scores.values():
        score.pop("first_call_s")
    return {"runner": runner, "base": base, "file_bytes": file_bytes, "build_s": build_s, "scores": scores}


def _time_points(bench: Bench, model: str, ready: dict, rounds: int) -> list[dict]:
    """One row per backend and point. At each point every backend is timed in `rounds` blocks of
    seconds/rounds, in turn, so that the speed-ups compare engines measured seconds apart."""
    rows = []
    for batch, (h, w) in bench.points:
        images = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        here = {b: x for b, x in ready.items() if (h, w) in x["scores"]}  # else: an engine not gated at this size
        samples, errors = _interleaved(bench, model, here, rounds, images)
        for backend, x in ready.items():
            row = {**x["base"], "batch": batch, "height": h, "width": w, "file_mib": x["file_bytes"] / 2**20,
                   **x["scores"].get((h, w), {})}  # fmt: skip
            if backend not in here:
                rows.append(bench.done({**row, "status": "not shipped", "error": x["runner"].outside((h, w))}))
            elif backend in errors:
                rows.append(bench.done({**row, "status": "failed", "error": errors[backend]}))
            else:
                rows.append(bench.done(_measured(bench, model, x, images, row | {"rounds": rounds}, samples[backend])))
    return rows


def _interleaved(bench: Bench, model: str, ready: dict, rounds: int, images: np.ndarray) -> tuple[dict, dict]:
    """Each backend's latency samples (ms) over `rounds` blocks taken in turn, and the error of any that failed."""
    s, (batch, h, w) = bench.settings, images.shape[:3]
    samples: dict[str, list[float]] = {b: [] for b in ready}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for backend, x in ready.items():
            if backend in errors:
                continue
            bench.bar.set_postfix_str(
                f"{model} {backend} b{batch} {h}x{w}" + (f" round {r + 1}/{rounds}" if rounds > 1 else "")
            )
            sync = torch.cuda.synchronize if bench.cuda and backend in TORCH else (lambda: None)
            try:
                warmup = s.warmup if r == 0 else 0.0  # later blocks: time_it's first call re-warms
                run = partial(x["runner"], images)
                timing, _ = time_it(run, warmup, s.seconds / rounds, -(-s.min_runs // rounds), sync)
                samples[backend] += timing.samples_ms
            except Exception as e:
                errors[backend] = _why(e)
    return samples, errors


def _measured(bench: Bench, model: str, x: dict, images: np.ndarray, row: dict, samples: list) -> dict:
    """A timed row: latency, throughput, memory, arithmetic rate against this CPU's peak."""
    batch, h, w = images.shape[:3]
    backend = row["backend"]
    row.update(Timing(samples).summary())
    row["images_per_s"] = 1e3 * batch / row["mean_ms"]
    if bench.cuda and backend in TORCH:  # the model call alone, from CUDA events, and its memory
        s = bench.settings
        torch.cuda.reset_peak_memory_stats()
        x["runner"].prepare(images)
        compute = time_cuda(x["runner"].compute, s.warmup, s.seconds, s.min_runs)
        row.update(compute.summary("compute_"), gpu_peak_mib=torch.cuda.max_memory_allocated() / 2**20)
    row["rss_mib"] = _rss_mib()
    windows = len(boxes(h, w, bench.window)) if row["mode"] == "slide" else 0
    row["gflop"] = windows * bench.gflop[(model, bench.window.window)] if windows else bench.gflop[(model, (h, w))]
    row["gflops_per_s"] = row["gflop"] * batch / (row["mean_ms"] / 1e3)
    peak = (bench.meta["gemm_peak_gflops"] or {}).get(precision_of(backend))  # the GEMM peak of its precision
    row["peak_gflops"], row["of_peak"] = peak, row["gflops_per_s"] / peak if peak else None
    row["build_s"] = x["build_s"]
    row["status"] = "ok"
    return row


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _why(e: Exception) -> str:
    log.debug("".join(traceback.format_exception(e)))
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: the run's students and their ensemble")
    rows = [*TORCH, *BACKENDS]  # read when the command runs: a row added to the table is a row here
    parser.add_argument("--backends", nargs="+", choices=rows, help="default: all this machine runs")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--sizes", nargs="+", type=parse_size, help="HxW (default: the eval size and 512x1024)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per configuration")
    parser.add_argument("--min-runs", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds of warm-up per configuration")
    parser.add_argument("--eval-images", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: each library's default)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each point in N rounds, every backend in turn (seconds/N each): speed-ups of "
                             "engines measured seconds apart, not minutes (a VM's speed drifts)")  # fmt: skip
    parser.add_argument("--slide", action="store_true", help="also rows by sliding windows of the serving size")
    parser.add_argument("--out", type=Path, help="default: RUN/bench")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    backends = list(dict.fromkeys([BASELINE, *(args.backends or default_backends(torch.cuda.is_available()))]))
    manifests = sorted((args.run / "export").glob("*/manifest.json"))
    engine_backends = [b for b in backends if b not in TORCH]
    if engine_backends and not manifests:  # the PyTorch rows alone need no export
        print(f"error: {args.run}/export has no engines for {' '.join(engine_backends)}: "
              f"run python -m export --run {args.run} first", file=sys.stderr)  # fmt: skip
        return 2
    sizes = args.sizes
    if not sizes:
        opt = tuple(read_manifest(manifests[0].parent).shapes["opt"][1:]) if manifests else None
        sizes = list(dict.fromkeys([s for s in (opt, (512, 1024)) if s]))
    try:
        models = run_models(args.run, args.models)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = Settings(
        models=models,
        backends=backends,
        batch_sizes=args.batch_sizes,
        sizes=sizes,
        seconds=args.seconds,
        min_runs=args.min_runs,
        warmup=args.warmup,
        eval_images=args.eval_images,
        threads=args.threads,
        rounds=args.rounds,
        modes=["fitted", "slide"] if args.slide else ["fitted"],
    )
    command = "python -m benchmarks.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run_bench(args.run, settings, args.out or args.run / "bench", command)
    print((args.out or args.run / "bench").joinpath("report.md").read_text())
    failed = [r for r in result["results"] if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
