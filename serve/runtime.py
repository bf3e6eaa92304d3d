"""Torch-free inference on the engines of an engine dir.

`open_engine(engine_dir, variant, io, backend)` reads the manifest and returns an engine whose
`run(batch)` maps the manifest's input array to its output array. Backends: ONNX Runtime (CPU,
CUDA and TensorRT execution providers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from serve.manifest import EngineEntry, IoMode, Manifest, read_manifest

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_NAMES = {"tensorrt": PROVIDER_ORDER[0], "cuda": PROVIDER_ORDER[1], "cpu": PROVIDER_ORDER[2]}


class Engine(Protocol):
    manifest: Manifest
    entry: EngineEntry

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def onnxruntime_providers(device: str = "auto") -> list[str]:
    """`auto`: every available provider in the order TensorRT, CUDA, CPU; else the one named (plus
    CPU, which runs what the accelerator does not support)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        return [p for p in PROVIDER_ORDER if p in available]
    if device not in PROVIDER_NAMES:
        raise ValueError(f"unknown ONNX Runtime device '{device}' (auto, {', '.join(PROVIDER_NAMES)})")
    wanted = PROVIDER_NAMES[device]
    if wanted not in available:
        raise RuntimeError(f"ONNX Runtime here has no {wanted} (available: {', '.join(available)})")
    return list(dict.fromkeys([wanted, "CPUExecutionProvider"]))


class OnnxRuntimeEngine:
    """One ONNX Runtime session. `model`: a file, or the serialized graph itself."""

    def __init__(
        self,
        model: str | Path | bytes,
        device: str = "auto",
        threads: int = 0,
        manifest: Manifest | None = None,
        entry: EngineEntry | None = None,
    ) -> None:
        import onnxruntime as ort

        self.manifest, self.entry = manifest, entry
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, options, providers=onnxruntime_providers(device))
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


def open_engine(
    engine_dir: str | Path,
    variant: str = "fp32",
    io: IoMode = "labels",
    backend: str = "onnxruntime",
    device: str = "auto",
    threads: int = 0,
) -> Engine:
    manifest = read_manifest(engine_dir)
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend '{backend}' (onnxruntime)")
    entry = manifest.find(variant, io, "onnx")
    return OnnxRuntimeEngine(Path(engine_dir) / entry.file, device, threads, manifest, entry)
