"""Run dir -> one engine dir per student: ONNX in both I/O modes and every precision, gated, described.

Everything is built in a temporary dir beside the target and renamed into place only when every
engine has passed its parity gate, so a failed export never leaves a half-written engine dir.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from export import card, graphs, parity, precision
from serve.backends import BACKENDS, Backend, runtime_problem
from serve.decide import at_least, interleaved, speedup_of
from serve.host import cpu_model
from serve.manifest import (
    PRECISION,
    VARIANTS,
    EngineEntry,
    Manifest,
    ManifestError,
    engine_metadata,
    read_manifest,
    sha256,
    sizes_text,
    write_manifest,
)
from serve.openvino import OpenVinoEngine
from serve.runtime import OPENERS, OnnxRuntimeEngine
from train.config import slot_config
from train.data import build_dataset
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.run_dir import IMPORTED_FILE, METRICS_FILE, STUDENTS, load_run_config, load_student, weights_file

log = logging.getLogger(__name__)

DEVICE = {"fp32": "any", "fp16": "any", "int8.qdq": "cuda", "int8.cpu": "cpu"}  # what a graph variant is meant for


@dataclass
class ExportOptions:
    students: list[str] = field(default_factory=lambda: list(STUDENTS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    out: Path | None = None  # default: <run>/export
    size: tuple[int, int] | None = None  # serving height, width (default: the first eval image's)
    max_batch: int = 16
    max_size: tuple[int, int] | None = None  # largest input H, W (default: twice the serving size, if it fits)
    profile_budget_mib: float = 2048  # the largest binding (fp32 logits) at the profile's max, see profile_shapes
    parity_images: int = 50
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16])  # the bench's defaults
    calib_images: int = 64
    opset: int = graphs.OPSET
    simplify: bool = True
    fp16_keep_fp32: list[str] = field(default_factory=list)  # op types the fp16 graph also keeps in fp32
    examples: int = 8  # eval images copied beside the engine dirs, for the demo app
    thresholds: dict[str, parity.Threshold] = field(default_factory=lambda: dict(parity.DEFAULT_THRESHOLDS))
    openvino: bool = True  # OpenVINO engines (fp32, bf16 where native, int8 Q/DQ) where openvino is installed
    size_sweep: bool = True  # the gate also checks parity.gate_sizes of the profile (False: the serving size only)
    int8_min_speedup: float = 1.5  # a CPU int8 engine ships only this much faster than the best float one...
    int8_max_miou_delta: float = 0.005  # ...and this close in mIoU (at the gate)


def profile_shapes(
    size: tuple[int, int], num_classes: int, max_batch: int, max_size: tuple[int, int] | None, budget_mib: float
) -> tuple[dict[str, list[int]], str | None]:
    """The engines' shape range (min / opt / max as [batch, height, width]) and why, when it was cut.

    TensorRT sizes an execution context for the profile's maximum, and the largest binding is the fp32
    logits (batch x classes x H x W x 4 bytes: 10 GB at batch 16, 2048x4096, 19 classes). So the max
    stays under `budget_mib`: twice the serving size at `max_batch` if that fits, else the serving size
    (larger images are scaled down into it by serve), else fewer images per batch. An explicit
    `max_size` is kept and only the batch is cut."""
    h, w = size
    per_pixel = num_classes * 4

    def mib(batch: int, hh: int, ww: int) -> float:
        return batch * hh * ww * per_pixel / 2**20

    tries = [tuple(max_size)] if max_size else [(2 * h, 2 * w), (h, w)]
    for hh, ww in tries:
        if mib(max_batch, hh, ww) <= budget_mib:
            wanted = f"{2 * h}x{2 * w} inputs would need {mib(max_batch, 2 * h, 2 * w):.0f} MiB of logits"
            note = None if (hh, ww) == tries[0] else f"{wanted}: larger images are scaled to {hh}x{ww}"
            break
    else:
        hh, ww = tries[-1]
        batch = max(1, int(budget_mib // mib(1, hh, ww)))
        note = (
            f"batch {max_batch} at {hh}x{ww} would need {mib(max_batch, hh, ww):.0f} MiB of logits, over the "
            f"{budget_mib} MiB budget (--profile-budget-mib): max batch {batch}"
        )
        max_batch = batch
    return {"min": [1, 32, 32], "opt": [1, h, w], "max": [max_batch, hh, ww]}, note


def engine_file(variant: str, io: str, fmt: str = "onnx") -> str:
    return f"model.{variant}{'.logits' if io == 'logits' else ''}.{fmt}"


def export_run(run_dir: str | Path, options: ExportOptions | None = None) -> dict[str, Manifest]:
    run = prepare(run_dir, options or ExportOptions())
    manifests = {name: _export_student(run, name) for name in run.opts.students}
    _write_examples(run.eval_set, run.out / "examples", run.opts.examples)  # only once every gate has passed
    card.write_cards(run.out)
    return manifests


def prepare(run_dir: str | Path, opts: ExportOptions) -> RunExport:
    """What every student's export of the run shares, its options checked: the config, the data, the profile."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    for name in opts.students:
        if name not in STUDENTS:
            raise ValueError(f"unknown student '{name}' (expected {' or '.join(STUDENTS)})")
    for v in opts.variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown precision variant '{v}' (expected one of {', '.join(VARIANTS)})")
    if "fp32" not in opts.variants:
        raise ValueError("the fp32 variant is required: every other precision is derived from it")
    out = Path(opts.out) if opts.out else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"cannot write to {out}")
    eval_set = build_dataset(cfg.data, cfg.data.eval_split, train=False)
    train_set = build_dataset(cfg.data, cfg.data.train_split, train=False)  # calibration, unaugmented
    size = tuple(opts.size) if opts.size else eval_set.read(0)[1].shape
    shapes, note = profile_shapes(size, cfg.data.num_classes, opts.max_batch, opts.max_size, opts.profile_budget_mib)
    if note:
        log.info("engine profile %s: %s", shapes["max"], note)
    if (fixed := _imported(run_dir).get("graph", {}).get("fixed")) and any(fixed):
        shapes = {key: [f or d for f, d in zip(fixed, dims, strict=True)] for key, dims in shapes.items()}
        log.info("engine profile %s: the imported graph's fixed dims %s", shapes["max"], fixed)
    if dropped := [b for b in opts.batch_sizes if b > shapes["max"][0]]:
        log.warning("parity batch sizes %s are over the profile's max batch %d: not checked", dropped, shapes["max"][0])
        opts = dataclasses.replace(opts, batch_sizes=[b for b in opts.batch_sizes if b <= shapes["max"][0]] or [1])
    return RunExport(run_dir, cfg, opts, out, shapes, eval_set, train_set)


def _write_examples(eval_set, folder: Path, count: int) -> None:
    """The first eval-split images, as PNG: the demo app shows them without needing the dataset."""
    folder.mkdir(exist_ok=True)
    for i in range(min(count, len(eval_set))):
        Image.fromarray(eval_set.read(i)[0]).save(folder / f"{i:03d}.png")


@dataclass
class RunExport:
    """What every student's export of one run shares: the run, the options, where it goes, the shapes, the data."""

    run_dir: Path
    cfg: object  # train.config.Config
    opts: ExportOptions
    out: Path
    shapes: dict[str, list[int]]
    eval_set: object
    train_set: object  # calibration images, unaugmented


def _imported(run_dir: Path) -> dict:
    """Where an imported run's model came from (export.imported), {} for a run trained here."""
    path = Path(run_dir) / IMPORTED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Source:
    """What one student's engines come from: its file, its `logits` graph (from its identity, the serving size
    and the opset; True when a cached trace gave it), the gate's reference (normalised NCHW -> logits at the
    input size) and what the manifest says of it."""

    file: Path
    graph: Callable[[str, tuple[int, int], int], tuple[onnx.ModelProto, bool]]
    reference: parity.Runner
    arch: str
    backbone: str
    exporter: dict = field(default_factory=dict)


def student_source(run_dir: Path, name: str, cfg) -> Source:
    """A student trained here (or imported as weights) is traced from PyTorch and gated against itself; an
    imported ONNX graph is wrapped (graphs.source_logits) and gated against the source on ONNX Runtime fp32."""
    imported = _imported(run_dir)
    if imported.get("format") == "onnx" and imported.get("student") == name:
        from export.imported import source_graph

        graph, reference = source_graph(run_dir, name, imported)
        exporter = {"opset": graphs.opset_of(graph), "dynamo": False}
        return Source(run_dir / f"{name}.onnx", lambda *_: (graph, False), reference, "onnx",
                      imported["architecture"], exporter)  # fmt: skip
    student = load_student(run_dir, name, cfg)
    slot = slot_config(cfg, name)
    trace = lambda identity, hw, opset: graphs.cached_logits(student, identity, hw, opset)  # noqa: E731
    return Source(weights_file(run_dir, name), trace, parity.torch_reference(student), slot.arch, slot.backbone)


def _export_student(run: RunExport, name: str) -> Manifest:
    final = run.out / name
    for left in run.out.glob(f".{name}-*"):  # what a killed export was building (one export at a time: a lock)
        shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=run.out))
    try:
        manifest = _build(*student_job(run, name, tmp))
        write_manifest(manifest, tmp)
        (tmp / "parity.json").write_text(json.dumps({e.name: e.parity for e in manifest.engines}, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        if final.exists():
            _keep_plans(final, tmp, manifest)
        swap_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d engines in %s", name, len(manifest.engines), final)
    return manifest


def student_job(run: RunExport, name: str, folder: Path) -> tuple[StudentExport, Manifest]:
    """One student's export, built in `folder`, and its manifest before its engines."""
    student = student_source(run.run_dir, name, run.cfg)
    metrics = run.run_dir / METRICS_FILE
    source = {
        "run": str(run.run_dir),
        "weights": student.file.name,
        "sha256": sha256(student.file),
        "val_miou": json.loads(metrics.read_text())[name]["miou"] if metrics.is_file() else None,
    }
    if imported := _imported(run.run_dir):
        source["imported"] = imported
    job = StudentExport(student, run.cfg, name, run.opts, run.eval_set, run.train_set, folder)
    return job, _describe(run.cfg, name, student, run.opts, run.shapes, source)


VERSIONS = ".versions"  # in an export dir: each student's engine sets, the live one linked by the student's name


def swap_into_place(built: Path, final: Path) -> None:
    """Make the engine set `built` live as `final` in one atomic step: `final` is a relative symlink to
    `.versions/<name>-<stamp>` and is replaced by a rename, so a reader, or a kill at any moment, finds the
    previous complete set or the new one, never neither and never a mix. Older sets are removed after."""
    versions = final.parent / VERSIONS
    versions.mkdir(exist_ok=True)
    live = versions / f"{final.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    built.rename(live)
    link = final.with_name(f".{final.name}.link")
    link.unlink(missing_ok=True)
    link.symlink_to(live.relative_to(final.parent))
    if final.is_dir() and not final.is_symlink():  # an engine dir of an earlier version: moved aside, once
        final.rename(versions / f"{final.name}-earlier-{os.getpid()}")
    os.replace(link, final)
    for old in versions.glob(f"{final.name}-*"):
        if old != live:
            shutil.rmtree(old, ignore_errors=True)


def _keep_plans(old_dir: Path, new_dir: Path, manifest: Manifest) -> None:
    """Carry the TensorRT plans of a previous export over when their ONNX source is byte-identical
    (a plan build takes minutes); the others are dropped, and the log says so."""
    try:
        old = read_manifest(old_dir)
    except ManifestError:
        return
    onnx_sha = {e.file: sha256(new_dir / e.file) for e in manifest.engines if e.runtime == "onnxruntime"}
    for plan in (e for e in old.engines if e.format == "plan"):
        source = engine_file(plan.variant, plan.io)
        if source in onnx_sha and (plan.tensorrt or {}).get("onnx_sha256") == onnx_sha[source]:
            shutil.copy2(old_dir / plan.file, new_dir / plan.file)
            manifest.engines.append(plan)
            log.info("%s: kept %s (its ONNX is unchanged)", manifest.student, plan.file)
        else:
            log.warning(
                "%s: dropped %s, its ONNX changed (python -m export.tensorrt rebuilds it)", manifest.student, plan.file
            )
    write_manifest(manifest, new_dir)


@dataclass
class StudentExport:
    """What one student's export works on: the student, where it builds, and the data it is gated on."""

    student: Source
    cfg: object  # train.config.Config
    name: str
    opts: ExportOptions
    eval_set: object
    train_set: object
    tmp: Path


def _build(job: StudentExport, manifest: Manifest) -> Manifest:
    size = tuple(manifest.shapes["opt"][1:])  # the serving size
    entries = write_engines(job, manifest)
    o = job.opts
    sweep = manifest.shapes if o.size_sweep else None

    reference = parity.memoised(job.student.reference)  # the same images again for every group and island try

    def candidates(group: list[EngineEntry]) -> list[parity.Candidate]:  # sessions go when checked (memory)
        return [parity.Candidate(e.name, e.io, e.precision, runner(e, job.tmp, gate=True)) for e in group]

    def gate(group: list[EngineEntry]) -> None:
        reports = parity.check(reference, candidates(group), job.eval_set, o.parity_images,
                               o.batch_sizes, o.thresholds, sweep)  # fmt: skip
        for e in group:
            e.parity = reports[e.name]

    def at_sizes(group: list[EngineEntry], sizes: list[tuple[int, int]], max_batch: int) -> dict[str, dict]:
        return parity.size_sweep(reference, candidates(group), job.eval_set, sizes, max_batch)

    def probe(group: list[EngineEntry], size: tuple[int, int]) -> float:  # the lowest agreement at one size
        points = at_sizes(group, [size], manifest.shapes["max"][0])
        return min(v for engine in points.values() for v in engine.values())

    def widest(group: list[EngineEntry]) -> dict[str, list[int]] | None:
        return _widest_box(job.name, manifest.shapes, group, at_sizes)

    cpu_int8 = [e for e in entries if e.variant == "int8.cpu"]
    entries = [e for e in entries if e.variant != "int8.cpu"]
    gate(entries)
    skipped = manifest.skipped + _drop_failed(job.name, entries, manifest.shapes, widest)
    times = time_cpu_engines(job, entries + cpu_int8, size)
    verdicts = int8_verdicts(entries + cpu_int8, times, o.int8_min_speedup, o.int8_max_miou_delta)
    if any(v["ship"] for v in verdicts):  # CPU int8 is gated where its speed pays for it, and only there
        gate(cpu_int8)
        try:
            tried = _int8_islands(job, manifest, cpu_int8, gate, probe)
        except Exception as e:  # a graph the Q/DQ analysis cannot take (an imported one, say): it stays refused
            tried = cpu_int8
            manifest.exporter["int8_fp32_islands"] = f"not tried: {type(e).__name__}: {e}"
            log.warning("%s: no fp32 islands for int8.cpu: %s: %s", job.name, type(e).__name__, e)
        skipped += _drop_failed(job.name, tried, manifest.shapes, widest)
        entries += tried
        if tried is not cpu_int8:  # another graph: timed again
            times = time_cpu_engines(job, entries, size)
        verdicts = int8_verdicts(entries, times, o.int8_min_speedup, o.int8_max_miou_delta)
    for verdict in (v for v in verdicts if not v["ship"]):
        runtime, precision_, variant = verdict["engine"]
        entries[:] = [e for e in entries if (e.runtime, e.precision, e.variant) != verdict["engine"]]
        skipped.append({"runtime": runtime, "precision": precision_, "variant": variant, "reason": verdict["reason"]})
        log.info("%s: %s not shipped: %s", job.name, verdict["backend"], verdict["reason"])
    _remove_unused_files(entries, job.tmp)
    manifest.engines, manifest.skipped, manifest.decisions = entries, skipped, verdicts
    shipped = {b for b in times if any(_runs(BACKENDS[b], e) for e in entries)}
    manifest.timings = {"cpu": cpu_model(), "size": list(size), "batch": 1,
                        "ms": {b: statistics.median(ms) for b, ms in times.items() if b in shipped}}  # fmt: skip
    return manifest


def write_engines(job: StudentExport, manifest: Manifest) -> list[EngineEntry]:
    """Every engine an export of the student gates, written into `job.tmp`: each variant's graph in both I/O modes,
    and the OpenVINO engines this host runs."""
    entries = _write_graphs(job, manifest)
    if not job.opts.openvino:
        return entries
    openvino, left_out = _openvino_entries(entries)
    manifest.skipped += left_out
    return entries + openvino


def _write_graphs(job: StudentExport, manifest: Manifest) -> list[EngineEntry]:
    """Every variant's ONNX graph, in both I/O modes, written with its own manifest as metadata."""
    started = time.perf_counter()
    student_cfg = dataclasses.asdict(slot_config(job.cfg, job.name))
    identity = repr((manifest.source["sha256"], student_cfg, len(manifest.classes)))
    serving = tuple(manifest.shapes["opt"][1:])
    logits, manifest.exporter["cached_trace"] = job.student.graph(identity, serving, job.opts.opset)
    export_s = time.perf_counter() - started
    if job.opts.simplify:
        slim = graphs.simplify(logits)
        if _same_outputs(logits, slim, job.eval_set, min(2, manifest.shapes["max"][0])):
            logits, manifest.exporter["simplifier"] = slim, "onnxslim"
        else:
            log.warning("%s: onnxslim changed the outputs; keeping the unsimplified graph", job.name)
    calibration, entries = None, []
    for variant in job.opts.variants:
        started = time.perf_counter()
        try:
            if variant == "fp32":
                graph = logits
            elif variant == "fp16":
                keep = manifest.exporter["fp16_keep_fp32"] = precision.FP16_KEEP_FP32 + job.opts.fp16_keep_fp32
                graph = precision.to_fp16(logits, keep)
            else:
                if calibration is None:
                    calibration = calibration_batches(job.train_set, job.opts.calib_images, job.cfg.seed)
                graph = precision.to_int8(logits, calibration, variant)
        except Exception as e:  # a converter that cannot take this graph (an imported one, say): that variant only
            if variant == "fp32":
                raise
            reason = f"the {variant} conversion failed: {type(e).__name__}: {e}"
            manifest.skipped.append({"runtime": "onnxruntime", "precision": PRECISION[variant], "variant": variant,
                                     "reason": reason})  # fmt: skip
            log.warning("%s: %s not made: %s", job.name, variant, reason)
            continue
        build_s = (export_s if variant == "fp32" else 0) + time.perf_counter() - started
        entries += _save_variant(job, manifest, variant, graph, build_s)
    return entries


def _save_variant(job: StudentExport, manifest: Manifest, variant: str, graph: onnx.ModelProto,
                  build_s: float) -> list[EngineEntry]:  # fmt: skip
    """One variant's `logits` graph and its `labels` graph, written with their manifest as metadata."""
    entries = []
    for io, model in (("logits", graph), ("labels", graphs.labels_model(graph, IMAGENET_MEAN, IMAGENET_STD))):
        path = job.tmp / engine_file(variant, io)
        entry = EngineEntry(path.name, "onnx", io, variant, PRECISION[variant], "onnxruntime", DEVICE[variant])
        graphs.save(graphs.with_metadata(model, engine_metadata(manifest, entry)), path)
        entry.size_bytes, entry.build_s = path.stat().st_size, round(build_s, 2)
        entries.append(entry)
    return entries


ISLANDS = (2, 4, 8)  # how many of a refused CPU int8 graph's worst-quantized tensors it keeps fp32, in turn


def _int8_islands(job: StudentExport, manifest: Manifest, group: list[EngineEntry], gate,
                  probe) -> list[EngineEntry]:  # fmt: skip
    """A CPU int8 graph the gate refused, quantized again with fp32 islands: the ops reading its 2, then 4, then 8
    most quantization-damaged tensors (each tensor's own Q/DQ signal-to-noise, ONNX Runtime's qdq_loss_debug, on
    a few eval images at its worst point) kept fp32, each try gated (`gate`) until every engine on it passes; a
    try but the last still below the bar at that point (`probe`) goes without the whole gate.
    `group`: the int8.cpu engines, gated. The first try that passes replaces them, else the last try's, refused (the
    same list back: no try); the manifest lists the graph without islands and every try (exporter.int8_fp32_islands).
    The demo CNN: 98.92 % -> 99.03 % with 4."""
    if not group or all(e.parity["passed"] for e in group):
        return group
    points = {k: v for e in group for k, v in e.parity["sizes"].items()}
    worst = min(points, key=points.get) if points else None
    size = tuple(map(int, worst.split("@")[0].split("x"))) if worst else tuple(manifest.shapes["opt"][1:])
    x = parity.normalise(parity.resized_images(job.eval_set, 2, size))  # every tensor of both graphs is held
    fp32, int8 = (job.tmp / engine_file(v, "logits") for v in ("fp32", "int8.cpu"))
    tensors = precision.worst_tensors(int8, fp32, x, ISLANDS[-1])
    source = onnx.load(str(fp32))
    calibration = calibration_batches(job.train_set, job.opts.calib_images, job.cfg.seed)
    bar = parity.threshold_for("int8", job.opts.thresholds).agreement
    first = {"fp32": [], "agreement": min(e.parity["agreement"] for e in group), "passed": False}
    tries = manifest.exporter["int8_fp32_islands"] = [first]
    for count in ISLANDS:
        started = time.perf_counter()
        nodes = [node for row in tensors[:count] for node in row["read_by"]]
        graph = precision.to_int8(source, calibration, "int8.cpu", keep_fp32=nodes)
        retry = _save_variant(job, manifest, "int8.cpu", graph, time.perf_counter() - started)
        retry += _openvino_entries(retry)[0] if any(e.runtime == "openvino" for e in group) else []
        if count != ISLANDS[-1] and (at_worst := probe(retry, size)) < bar:  # the last try is gated: its record
            tries.append({"fp32": nodes, "agreement": at_worst, "passed": False, "at": "x".join(map(str, size))})
            log.info("%s: int8.cpu with %d ops fp32: agreement %.2f%% at %s", job.name, len(nodes), 100 * at_worst,
                     tries[-1]["at"])  # fmt: skip
            continue
        gate(retry)
        passed = all(e.parity["passed"] for e in retry)
        tries.append({"fp32": nodes, "agreement": min(e.parity["agreement"] for e in retry), "passed": passed})
        log.info("%s: int8.cpu with %d ops fp32: agreement %.2f%%%s", job.name, len(nodes),
                 100 * tries[-1]["agreement"], ", passes" if passed else "")  # fmt: skip
        if passed:
            break
    return retry


def _widest_box(name: str, shapes: dict[str, list[int]], group: list[EngineEntry],
                at_sizes: Callable[..., dict[str, dict[str, float]]]) -> dict[str, list[int]] | None:  # fmt: skip
    """The widest of parity.boxes in which every engine of `group` passes a gate of its own: the box's gate sizes
    at batch 1 and its largest batch, those the gate measured already read from its reports. A box holding a
    point that failed is not tried."""
    bar = min(e.parity["threshold"]["agreement"] for e in group)
    reports = [e.parity["sizes"] for e in group]
    known = {k: min(r[k] for r in reports) for k in reports[0] if all(k in r for r in reports)}
    for box in parity.boxes(shapes):
        here = {k: v for k, v in known.items() if parity.inside(box, k)}
        if min(here.values(), default=bar) < bar:
            continue
        batches = dict.fromkeys([1, box["max"][0]])
        new = [s for s in parity.gate_sizes(box) if any(f"{s[0]}x{s[1]}@{b}" not in known for b in batches)]
        points = at_sizes(group, new, box["max"][0]) if new else {}
        here |= {k: min(engine[k] for engine in points.values()) for k in next(iter(points.values()), {})}
        worst = min(here, key=here.get)
        log.info("%s: %s from %s: worst agreement %.2f%% at %s (%d sizes not gated before)", name, group[0].name,
                 sizes_text(box), 100 * here[worst], worst, len(new))  # fmt: skip
        if here[worst] >= bar:
            return box
    return None


def _drop_failed(name: str, entries: list[EngineEntry], shapes: dict[str, list[int]],
                 widest: Callable[[list[EngineEntry]], dict | None]) -> list[dict[str, str]]:  # fmt: skip
    """Remove the engines that failed the gate from `entries` (both I/O modes; an ONNX graph that fails on
    ONNX Runtime takes the OpenVINO engines that run it along) and return why. An engine that failed only away
    from the serving size stays, its profile narrowed to the widest box `widest` gates it in, else to that size
    (serve runs other sizes on the next engine). fp32 on ONNX Runtime is the reference every engine derives
    from: its failure stops the export."""
    failed: dict[tuple[str, str, str], list[str]] = {}
    for e in entries:
        failed.setdefault((e.runtime, e.precision, e.variant), []).extend(parity.failures({e.name: e.parity}))
    failed = {key: lines for key, lines in failed.items() if lines}
    if ("onnxruntime", "fp32", "fp32") in failed:
        lines = [line for variant in failed.values() for line in variant]
        raise parity.ParityError(f"{name}: the parity gate failed (nothing written):\n  " + "\n  ".join(lines))
    skipped, serving = [], shapes["opt"][1:]
    for (runtime, precision_, variant), lines in failed.items():
        group = [e for e in entries if (e.runtime, e.precision, e.variant) == (runtime, precision_, variant)]
        if all(parity.only_elsewhere(e.parity, serving) for e in group):
            reason = "failed the parity gate at other sizes: " + "; ".join(lines)
            box = widest(group) or {"min": [1, *serving], "opt": [1, *serving], "max": [shapes["max"][0], *serving]}
            for e in group:
                e.profile = {**box, "reason": reason}
            log.warning("%s: %s %s (%s) ships for %s inputs only, it %s", name, runtime, precision_, variant,
                        sizes_text(box), reason)  # fmt: skip
            continue
        whole_graph = runtime == "onnxruntime"  # its file goes, and every engine that runs it
        entries[:] = [
            e
            for e in entries
            if not (e.variant == variant and (whole_graph or (e.runtime, e.precision) == (runtime, precision_)))
        ]
        reason = "failed the parity gate: " + "; ".join(lines)
        skipped.append({"runtime": runtime, "precision": precision_, "variant": variant, "reason": reason})
        log.warning("%s: %s %s (%s) not shipped, it %s", name, runtime, precision_, variant, reason)
    return skipped


def _remove_unused_files(entries: list[EngineEntry], folder: Path) -> None:
    """Delete the ONNX files no shipped engine runs any more."""
    used = {e.file for e in entries}
    for path in folder.glob("*.onnx"):
        if path.name not in used:
            path.unlink()


def _openvino_entries(onnx_entries: list[EngineEntry]) -> tuple[list[EngineEntry], list[dict[str, str]]]:
    """OpenVINO engines on this CPU for the ONNX files just written, one per OpenVINO row of the backend table
    this host runs (fp32; bf16 where the CPU has it natively; int8 on the CPU int8 graph), each gated like the
    others; and a record of each row not made here, with why (openvino absent, no native bf16)."""
    rows = [b for b in BACKENDS.values() if b.runtime == "openvino"]
    variants = {e.variant for e in onnx_entries}
    made = [r for r in rows if variants & set(r.variants)]

    def left_out(row: Backend, reason: str) -> dict[str, str]:
        log.info("no OpenVINO %s engine: %s", row.precision, reason)
        return {"runtime": "openvino", "precision": row.precision, "variant": row.variants[0], "reason": reason}

    if problem := runtime_problem("openvino"):
        return [], [left_out(row, problem) for row in made]
    from serve.openvino import capabilities

    try:
        host = capabilities()
    except RuntimeError as e:  # OpenVinoUnavailable
        return [], [left_out(row, str(e)) for row in made]
    out, skipped = [], []
    for row in made:
        if row.precision == "bf16" and "BF16" not in host["precisions"]:
            skipped.append(left_out(row, f"{host['cpu']} computes no bf16 natively"))
            continue
        out += [
            EngineEntry(e.file, "onnx", e.io, e.variant, row.precision, "openvino", "cpu", e.size_bytes, openvino=host)
            for e in onnx_entries
            if e.variant in row.variants
        ]
    return out, skipped


def runner(entry: EngineEntry, folder: Path, gate: bool = False):
    """`entry`'s engine on the CPU, opened as serve opens it, but OpenVINO without its check compile of the dynamic
    graph (it compiles each shape it meets, as in serve). The gate (`gate`) runs shape by shape with every engine
    open at once, so there each holds only the memory of the shape at hand: ONNX Runtime without its arena,
    OpenVINO with one compiled shape (with the arena and eight shapes, a B0 with 150 classes filled 22 GB at
    4x512x512)."""
    path = folder / entry.file
    if gate and entry.runtime == "onnxruntime":
        return OnnxRuntimeEngine(path, "cpu", 0, None, entry, arena=False).run
    if entry.runtime == "openvino":
        return OpenVinoEngine(path, entry.precision, entry=entry, shapes_kept=1 if gate else None,
                              check_at_load=False).run  # fmt: skip
    return OPENERS[entry.runtime](path, None, entry, "cpu", 0).run


def _describe(cfg, name: str, student: Source, opts: ExportOptions, shapes: dict[str, list[int]],
              source: dict) -> Manifest:  # fmt: skip
    """The engine dir's manifest before its engines: the student, its data contract and its source."""
    return Manifest(
        student=name,
        arch=student.arch,
        backbone=student.backbone,
        classes=list(cfg.data.class_names),
        palette=[list(c) for c in cfg.data.palette],
        preprocess={
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "scale": 255,
            "resize": "none",  # any size in the ranges below; the student aligns internally
            "size_multiple": 1,
        },
        shapes=shapes,
        source=source,
        exporter={
            "segdeploy": _project_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": _ort_version(),
            "opset": opts.opset,
            "dynamo": True,
            "simplifier": None,
            "parity": {
                "images": opts.parity_images,
                "batch_sizes": opts.batch_sizes,
                # the sweep's sizes, each checked at batch 1 and the largest batch (none: --no-size-sweep)
                "sizes": [list(s) for s in parity.gate_sizes(shapes)] if opts.size_sweep else [],
            },
            "profile_budget_mib": opts.profile_budget_mib,
            "thresholds": {k: asdict(v) for k, v in opts.thresholds.items()},
        }
        | student.exporter,
    )


def _project_version() -> str:
    try:
        return importlib.metadata.version("segdeploy")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, eval_set, batch: int) -> bool:
    """Whether the simplified graph gives the unsimplified graph's logits on a few real images."""
    x = next(parity.batches(eval_set, batch, batch))[0]
    outs = [OnnxRuntimeEngine(m.SerializeToString(), device="cpu").run(parity.normalise(x)) for m in (a, b)]
    return bool(np.allclose(outs[0], outs[1], atol=1e-4, rtol=1e-4) and (outs[0].argmax(1) == outs[1].argmax(1)).all())


def calibration_batches(train_set, count: int, seed: int) -> list[np.ndarray]:
    """`count` training images (a seeded random choice), one per batch, normalised as in training."""
    order = np.random.default_rng(seed).permutation(len(train_set))[:count]
    return [parity.normalise(train_set.read(int(i))[0][None]) for i in order]


def _runs(row: Backend, entry: EngineEntry) -> bool:
    """Whether a backend row runs this engine (its runtime, precision and one of its graph variants)."""
    return (row.runtime, row.precision) == (entry.runtime, entry.precision) and entry.variant in row.variants


def cpu_backend(entry: EngineEntry) -> Backend | None:
    """The CPU backend row that runs this engine (None: it is not a CPU engine)."""
    return next((b for b in BACKENDS.values() if b.device == "cpu" and _runs(b, entry)), None)


def time_cpu_engines(job: StudentExport, entries: list[EngineEntry], size: tuple[int, int]) -> dict[str, list[float]]:
    """Per-round latency (ms) of every CPU backend's labels engine at the serving size, batch 1, opened as serve
    opens it and all timed in interleaved rounds (serve.decide), more of them while an int8 engine's speed-up
    straddles its bar: what the int8 rule decides on and serve's engine pick reads."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    runs = {}
    for row in (b for b in BACKENDS.values() if b.device == "cpu"):
        for variant in row.variants:  # the engine the row opens: its first variant shipped
            entry = next((e for e in entries if e.io == "labels" and e.variant == variant and _runs(row, e)), None)
            if entry is not None:
                runs[row.name] = runner(entry, job.tmp)
                break
    o = job.opts
    settled = lambda times: all(  # noqa: E731
        v["outcome"] != "straddles" for v in int8_verdicts(entries, times, o.int8_min_speedup, o.int8_max_miou_delta)
    )
    return interleaved(runs, pixels, settled=settled)


def int8_verdicts(entries: list[EngineEntry], times: dict[str, list[float]], min_speedup: float,
                  max_delta: float) -> list[dict]:  # fmt: skip
    """A CPU int8 engine (ONNX Runtime's int8.cpu, OpenVINO's int8) ships only when it pays for its accuracy:
    its speed-up over the fastest float CPU engine (ONNX Runtime fp32, OpenVINO fp32 or bf16) clears
    `min_speedup` (serve.decide.at_least: the 95 % interval over interleaved rounds, straddling stays out),
    and |ΔmIoU| <= `max_delta` at the gate. One record per int8 engine, with the numbers that decided it. Before
    its gate (no parity yet) the speed alone decides: an engine too slow to ship is not worth gating."""
    floats = {name: ms for name, ms in times.items() if BACKENDS[name].precision in ("fp32", "bf16")}
    reference = min(floats, key=lambda name: statistics.median(floats[name]))
    verdicts = []
    for name in (n for n in times if BACKENDS[n].precision == "int8"):
        row = BACKENDS[name]
        group = [e for e in entries if _runs(row, e) and e.variant == "int8.cpu"]
        if not group:  # it runs TensorRT's int8.qdq graph, which ships for TensorRT whatever its CPU speed
            continue
        gated = all(e.parity for e in group)
        delta = max(abs(e.parity["miou_delta"]) for e in group) if gated else None
        verdict = at_least(speedup_of(floats[reference], times[name]), min_speedup)
        ship = verdict.ship and (delta is None or delta <= max_delta)
        s = verdict.speedup
        reason = (
            f"{s['b_ms']:.2f} ms at batch 1: {s['ratio']:.2f}x [{s['low']:.2f}, {s['high']:.2f}] the fastest float "
            f"engine ({reference}, {s['a_ms']:.2f} ms) over {s['rounds']} interleaved rounds ({verdict.outcome}), "
            + (f"|ΔmIoU| {delta:.4f}" if gated else "not gated")
            + f"; ships when the interval clears {min_speedup}x and |ΔmIoU| <= {max_delta}"
        )
        engine = (row.runtime, row.precision, "int8.cpu")
        verdicts.append(verdict.record(backend=name, engine=engine, reference=reference, miou_delta=delta,
                                       ship=ship, reason=reason))  # fmt: skip
    return verdicts
