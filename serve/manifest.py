"""The engine dir contract: `manifest.json` describes every engine file of one student.

Written by `export/`, read here without torch: a serving host learns everything (I/O layout,
normalisation, classes, palette, shape ranges) from this file alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 2  # 2: an engine's file (format, variant) and what runs it (runtime, device) are separate fields
MANIFEST_FILE = "manifest.json"
METADATA_KEY = "segdeploy.manifest"  # in each ONNX file: its own one-engine manifest

IoMode = Literal["labels", "logits"]
# Variant names in file names: model.<variant>[.logits].<onnx|plan>
VARIANTS = ("fp32", "fp16", "int8.qdq", "int8.cpu")
PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8.qdq": "int8", "int8.cpu": "int8"}  # what a variant computes in

# What each I/O mode feeds and returns (the same for every engine of that mode).
IO_SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "labels": {
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "meaning": "RGB image, 0-255"},
        "output": {"name": "labels", "dtype": "uint8", "layout": "NHW", "meaning": "class index per pixel"},
    },
    "logits": {
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW", "meaning": "RGB image, (x/255-mean)/std"},
        "output": {"name": "logits", "dtype": "float32", "layout": "NCHW", "meaning": "class scores at input size"},
    },
}


class ManifestError(ValueError):
    """A missing, unreadable or inconsistent manifest; the message names the file and the field."""


@dataclass
class EngineEntry:
    """One engine: an engine file (what it is) and the runtime that runs it (what it was gated on)."""

    file: str
    format: Literal["onnx", "plan"]  # an ONNX graph or a TensorRT plan
    io: IoMode
    variant: str  # the graph's precision recipe: fp32 | fp16 | int8.qdq | int8.cpu
    precision: str  # what it computes in: fp32 | fp16 | bf16 | int8
    runtime: str = "onnxruntime"  # onnxruntime | openvino | tensorrt
    device: str = "any"  # what it is meant for: any | cpu | cuda
    size_bytes: int = 0
    build_s: float = 0.0
    parity: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None  # plans: version, GPU name, compute capability
    openvino: dict[str, Any] | None = None  # OpenVINO engines: version, CPU and its precisions it was gated on
    profile: dict[str, Any] | None = None  # narrower min / opt / max than the manifest's (where it passed), reason

    @property
    def key(self) -> str:
        return f"{self.runtime}/{self.precision}/{self.variant}/{self.io}"

    @property
    def name(self) -> str:
        """Unique in an engine dir: the file, or for OpenVINO (which runs the dir's ONNX files) its precision too."""
        return f"{self.file} [openvino {self.precision}]" if self.runtime == "openvino" else self.file


@dataclass
class Manifest:
    student: str
    arch: str
    backbone: str
    classes: list[str]
    palette: list[list[int]]
    preprocess: dict[str, Any]  # mean, std (0-1 scale), resize policy, size multiple
    shapes: dict[str, list[int]]  # min / opt / max as [batch, height, width]
    source: dict[str, Any]  # run dir, weights file, sha256, iteration, val mIoU
    exporter: dict[str, Any]  # versions, opset, dynamo, simplifier
    engines: list[EngineEntry] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # runtime, variant, precision not shipped, and why
    decisions: list[dict[str, Any]] = field(default_factory=list)  # export's keep-or-drop verdicts, with their numbers
    timings: dict[str, Any] = field(default_factory=dict)  # CPU backends' median ms at the serving size, and the CPU
    io: dict[str, Any] = field(default_factory=lambda: IO_SPECS)
    schema: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def first(
        self, runtime: str, precision: str, variants: tuple[str, ...], io: IoMode = "labels"
    ) -> EngineEntry | None:
        """The engine a runtime runs at a precision: the first of `variants` shipped for it (None: none is)."""
        for variant in variants:
            for e in self.engines:
                if (e.runtime, e.precision, e.variant, e.io) == (runtime, precision, variant, io):
                    return e
        return None

    def find(self, runtime: str, precision: str, variants: tuple[str, ...], io: IoMode = "labels") -> EngineEntry:
        """`first`, or an error that lists what the dir has."""
        if (entry := self.first(runtime, precision, variants, io)) is not None:
            return entry
        have = ", ".join(e.key for e in self.engines) or "none"
        raise ManifestError(f"no {runtime} {precision} {io} engine for {self.student} (have: {have})")

    def left_out(self, runtime: str, precision: str, variants: tuple[str, ...]) -> str | None:
        """Why the export did not ship the engines a runtime would run at a precision, where it says."""
        for s in self.skipped:
            if (s["runtime"], s["precision"]) == (runtime, precision) and s["variant"] in variants:
                return s["reason"]
        return None

    def profile(self, io: IoMode, narrowed: dict[str, Any] | None = None) -> tuple[tuple[int, ...], ...]:
        """min / opt / max input shapes of the TensorRT profile in the I/O mode's layout (opt = serving); an
        engine's own `narrowed` profile (EngineEntry.profile) where the gate passed it at fewer sizes."""
        shapes = []
        for key in ("min", "opt", "max"):
            n, h, w = (narrowed or self.shapes)[key]
            shapes.append((n, h, w, 3) if io == "labels" else (n, 3, h, w))
        return shapes[0], shapes[1], shapes[2]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def sizes_text(profile: dict[str, Any], times: str = "x") -> str:
    """A profile's input sizes: "HxW" where it holds one size, else "HxW to HxW"."""
    low, high = (times.join(map(str, profile[k][1:])) for k in ("min", "max"))
    return low if low == high else f"{low} to {high}"


def hex_colour(rgb: list[int]) -> str:
    """A palette entry as CSS / Markdown write it: [230, 25, 75] -> #e6194b."""
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def sha256(path: str | Path) -> str:
    """Hex digest of a file (the manifest records those of the weights and of each plan's ONNX)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, engine_dir: str | Path) -> Path:
    path = Path(engine_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json() + "\n")
    tmp.replace(path)
    return path


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Load and check an engine dir's manifest; every engine file it lists must exist."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"not an engine dir (no {MANIFEST_FILE}): {engine_dir}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable JSON ({e})") from None
    manifest = parse_manifest(raw, str(path))
    for e in manifest.engines:
        if not (engine_dir / e.file).is_file():
            raise ManifestError(f"{path}: engine file {e.file} is missing from {engine_dir}")
    return manifest


def parse_manifest(raw: Any, where: str) -> Manifest:
    """A manifest from its JSON object, checked; `where` names its source in errors."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    raw = dict(raw)
    if raw.get("schema") == 1:
        raw = _from_schema_1(raw)
    if raw.get("schema") != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema {raw.get('schema')!r}, this runtime reads schema {SCHEMA_VERSION}")
    try:
        engines = [EngineEntry(**e) for e in raw.pop("engines", [])]
        manifest = Manifest(**raw, engines=engines)
    except TypeError as e:
        raise ManifestError(f"{where}: {e}") from None
    if len(manifest.palette) != manifest.num_classes:
        raise ManifestError(f"{where}: palette has {len(manifest.palette)} colours for {manifest.num_classes} classes")
    for e in manifest.engines:
        if e.io not in IO_SPECS:
            raise ManifestError(f"{where}: engines[{e.file}].io must be labels or logits, got {e.io!r}")
    return manifest


def _from_schema_1(raw: dict) -> dict:
    """A schema 1 manifest (format `openvino` for an ONNX file run by OpenVINO, `target` for the device) in
    schema 2's fields, so that engine dirs exported before still serve."""
    runtimes = {"onnx": "onnxruntime", "plan": "tensorrt", "openvino": "openvino"}
    devices = {"any": "any", "cpu": "cpu", "tensorrt": "cuda"}
    engines = []
    for e in raw.get("engines", []):
        e = dict(e)
        fmt, target = e.pop("format", "onnx"), e.pop("target", "any")
        e["runtime"], e["device"], e["format"] = (
            runtimes.get(fmt, fmt),
            devices.get(target, target),
            "plan" if fmt == "plan" else "onnx",
        )
        if fmt == "openvino" and e.get("variant") == "bf16":  # the fp32 graph, run at bf16
            e["variant"] = "fp32"
        engines.append(e)
    skipped = []
    for s in raw.get("skipped", []):
        runtime = "openvino" if s.get("backend") == "openvino" else "onnxruntime"
        variant = "fp32" if (runtime, s["variant"]) == ("openvino", "bf16") else s["variant"]
        precision = "bf16" if s["variant"] == "bf16" else PRECISION.get(s["variant"], s["variant"])
        skipped.append({"runtime": runtime, "variant": variant, "precision": precision, "reason": s["reason"]})
    return {**raw, "schema": SCHEMA_VERSION, "engines": engines, "skipped": skipped}


def engine_metadata(manifest: Manifest, entry: EngineEntry) -> dict[str, str]:
    """What an ONNX file says about itself (its metadata_props), so that a copy travels without its
    engine dir: the manifest with this engine alone under METADATA_KEY (what `serve` reads), and
    readable keys for model viewers. Nothing that changes between two exports of the same weights
    (no timings, parity or paths), so a plan's source-ONNX hash stays valid across re-exports."""
    one = Manifest(**{**asdict(manifest), "engines": [], "skipped": [], "decisions": [], "timings": {}})
    one.source = {**manifest.source, "run": Path(str(manifest.source.get("run", ""))).name}
    one.engines = [
        EngineEntry(entry.file, entry.format, entry.io, entry.variant, entry.precision, entry.runtime, entry.device)
    ]

    def describe(tensor: dict) -> str:
        return f"{tensor['name']}: {tensor['dtype']} {tensor['layout']}, {tensor['meaning']}"

    spec = IO_SPECS[entry.io]
    return {
        METADATA_KEY: json.dumps(asdict(one)),
        "student": f"{manifest.student}: {manifest.arch} on {manifest.backbone}",
        "classes": json.dumps(manifest.classes),
        "palette": json.dumps(manifest.palette),
        "mean": json.dumps(manifest.preprocess["mean"]),
        "std": json.dumps(manifest.preprocess["std"]),
        "input": describe(spec["input"]),
        "output": describe(spec["output"]),
        "precision": f"{entry.variant} ({entry.device})",
        "source_run": one.source["run"],
        "weights_sha256": str(manifest.source.get("sha256")),
        "val_miou": str(manifest.source.get("val_miou")),
        "version": str(manifest.exporter.get("segdeploy")),
    }
