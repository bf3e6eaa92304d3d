"""Torch-free inference on the engines of an engine dir.

`open_backend(engine_dir, "ort.cpu.fp32", io)` reads the manifest and returns the engine that backend (a row
of serve.backends.BACKENDS) runs, whose `run(batch)` maps the manifest's input array to its output array.
One opener per runtime (`OPENERS`): `onnxruntime` (CPU, CUDA and TensorRT execution providers, IO binding on
GPU), `tensorrt` (a plan run natively through TensorRT and pycuda, serve/tensorrt.py) and `openvino` (the ONNX
files on the CPU at an explicit precision, serve/openvino.py). An exported ONNX file also opens alone: it
carries its own one-engine manifest in its metadata.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from serve.backends import BACKENDS, ORT_PROVIDERS, RUNTIMES, Backend, backend_named, import_onnxruntime
from serve.manifest import (
    METADATA_KEY,
    PRECISION,
    EngineEntry,
    IoMode,
    Manifest,
    ManifestError,
    parse_manifest,
    read_manifest,
)

log = logging.getLogger(__name__)


class Engine(Protocol):
    manifest: Manifest | None
    entry: EngineEntry | None

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def onnxruntime_providers(device: str = "auto") -> list[str]:
    """`auto`: every available provider in the order TensorRT, CUDA, CPU; else the one named (plus
    CPU, which runs what the accelerator does not support)."""
    available = import_onnxruntime().get_available_providers()
    if device == "auto":
        return [p for p in ORT_PROVIDERS.values() if p in available]
    if device not in ORT_PROVIDERS:
        raise ValueError(f"unknown ONNX Runtime device '{device}' (auto, {', '.join(ORT_PROVIDERS)})")
    wanted = ORT_PROVIDERS[device]
    if wanted not in available:
        raise RuntimeError(f"ONNX Runtime here has no {wanted} (available: {', '.join(available)})")
    return list(dict.fromkeys([wanted, "CPUExecutionProvider"]))


TRT11_ORT = (1, 27)  # onnxruntime-gpu builds from here on link TensorRT 11: precision lives in the graph


def tensorrt_provider_options(
    model: Path, manifest: Manifest, entry: EngineEntry, ort_version: str = "1.26"
) -> dict[str, str]:
    """ONNX Runtime's TensorRT provider with the manifest's profile and caches beside the engine: with
    no options it builds a new engine for every new input shape (every new image aspect ratio)."""
    cache = model.parent / ".ort-trt-cache"
    name = manifest.io[entry.io]["input"]["name"]
    low, opt, high = (f"{name}:{'x'.join(map(str, s))}" for s in manifest.profile(entry.io, entry.profile))
    options = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": low,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": high,
    }
    if tuple(int(v) for v in ort_version.split(".")[:2]) < TRT11_ORT:
        # TensorRT 10 builds weakly typed here: without the flag an fp16 graph runs in fp32 kernels
        options["trt_fp16_enable"] = str(entry.precision == "fp16")
    return options


# The CUDA provider's options besides precision. Its defaults measured fastest (benchmarks/ort_cuda.py, H200,
# 1024x2048): NHWC and CUDA graphs were slower, the heuristic convolution search too.
CUDA_OPTIONS: dict[str, str] = {}


def cuda_provider_options(precision: str = "fp32", extra: dict[str, str] | None = None) -> dict[str, str]:
    """Strict fp32 for an fp32 engine (the provider's default computes fp32 convolutions and GEMMs in TF32), TF32
    allowed otherwise (`use_tf32=0` also keeps fp16 convolutions off the tensor cores: 4.9x slower), then
    CUDA_OPTIONS, then `extra` (a measurement's)."""
    return {"use_tf32": "0" if precision == "fp32" else "1", **CUDA_OPTIONS, **(extra or {})}


def provider_list(
    requested: list[str],
    model,
    manifest: Manifest | None,
    entry: EngineEntry | None,
    ort_version: str,
    cuda_options: dict[str, str] | None = None,
):
    """The providers with their options: the TensorRT provider with the manifest's profile, the CUDA provider's
    from cuda_provider_options."""
    providers: list = list(requested)
    for i, provider in enumerate(requested):
        if provider == ORT_PROVIDERS["tensorrt"] and isinstance(model, str) and manifest and entry:
            providers[i] = (provider, tensorrt_provider_options(Path(model), manifest, entry, ort_version))
        elif provider == ORT_PROVIDERS["cuda"]:
            providers[i] = (provider, cuda_provider_options(entry.precision if entry else "fp32", cuda_options))
    return providers


class OnnxRuntimeEngine:
    """One ONNX Runtime session. `model`: a file, or the serialized graph itself. On a GPU provider
    the output stays bound to the device until one copy back (IO binding)."""

    def __init__(
        self,
        model: str | Path | bytes,
        device: str = "auto",
        threads: int = 0,
        manifest: Manifest | None = None,
        entry: EngineEntry | None = None,
        cuda_options: dict[str, str] | None = None,
        arena: bool = True,
    ) -> None:
        ort = import_onnxruntime()
        self.manifest, self.entry = manifest, entry
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = arena  # off: memory goes back after each run (the gate's many sessions)
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        # Idle worker threads sleep instead of spinning: an ensemble's second session, the web server
        # and the pre/post-processing share these cores (ensemble on 2 cores: 20 -> 14 ms at 64x64).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        requested = onnxruntime_providers(device)
        if requested[0] != "CPUExecutionProvider" and hasattr(ort, "preload_dlls"):
            # CUDA and cuDNN from the nvidia-* wheels (or torch's), which the provider's dlopen does not search
            ort.preload_dlls()
        providers = provider_list(requested, source, manifest, entry, ort.__version__, cuda_options)
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own types, all bare Exception subclasses
            raise RuntimeError(
                f"{source if isinstance(source, str) else 'the graph'}: ONNX Runtime cannot open it ({e})"
            ) from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.providers = self.session.get_providers()
        # ONNX Runtime opens a session without a provider that failed to load (a missing libnvinfer or
        # cuDNN, a CUDA mismatch) and says so only in a log line hidden above: check what is active.
        if dropped := [p for p in requested if p not in self.providers]:
            name = source if isinstance(source, str) else "the graph"
            what = (
                f"ONNX Runtime could not enable {', '.join(dropped)} for {name}"
                f" (active: {', '.join(self.providers)}). Its libraries (CUDA, cuDNN, TensorRT) must be installed and "
                "match the onnxruntime-gpu build; ONNX Runtime's log says which failed: "
                'python -c "import onnxruntime as o; o.set_default_logger_severity(0); '
                f"o.InferenceSession('MODEL.onnx', providers={dropped!r})\""
            )
            if device != "auto":
                raise RuntimeError(what)
            log.warning("%s; running on %s", what, self.providers[0])
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"

    @property
    def device(self) -> str:
        return {v: k for k, v in ORT_PROVIDERS.items()}.get(self.providers[0], self.providers[0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        if not self.on_gpu:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def median_ms(run, batch: np.ndarray, min_runs: int = 5, seconds: float = 0.0) -> float:
    """Median latency of `run(batch)` in ms over at least `min_runs` calls and `seconds` (warm it up first)."""
    samples, deadline = [], time.perf_counter() + seconds
    while len(samples) < min_runs or time.perf_counter() < deadline:
        started = time.perf_counter()
        run(batch)
        samples.append(1e3 * (time.perf_counter() - started))
    return float(np.median(samples))


def _gpu(device: str) -> int:
    """The CUDA device index a GPU runtime runs on: `auto`, `cuda` and `tensorrt` are GPU 0."""
    if device in ("auto", "cuda", "tensorrt"):
        return 0
    index = device.removeprefix("cuda:")
    if not index.isdigit():
        raise ValueError(f"the tensorrt runtime runs on a GPU: device '{device}' is not auto, cuda, cuda:N or N")
    return int(index)


def _open_onnxruntime(path: Path, manifest: Manifest, entry: EngineEntry, device: str, threads: int) -> Engine:
    return OnnxRuntimeEngine(path, device, threads, manifest, entry)


def _open_openvino(path: Path, manifest: Manifest, entry: EngineEntry, device: str, threads: int) -> Engine:
    from serve.openvino import OpenVinoEngine

    return OpenVinoEngine(path, entry.precision, threads, manifest, entry)


def _open_tensorrt(path: Path, manifest: Manifest, entry: EngineEntry, device: str, threads: int) -> Engine:
    from serve.tensorrt import TensorRTEngine

    return TensorRTEngine(path, manifest, entry, _gpu(device))


OPENERS = {"onnxruntime": _open_onnxruntime, "openvino": _open_openvino, "tensorrt": _open_tensorrt}  # per RUNTIMES


def open_backend(
    engine_dir: str | Path, backend: str | Backend, io: IoMode = "labels", threads: int = 0, variant: str | None = None
) -> Engine:
    """The engine `backend` runs from `engine_dir`: the first of its graph variants shipped for its runtime and
    precision (`variant` pins one of them)."""
    row = backend if isinstance(backend, Backend) else backend_named(backend)
    if variant is not None and variant not in row.variants:
        raise ValueError(f"backend {row.name} runs the {', '.join(row.variants)} graphs, not {variant}")
    manifest = read_manifest(engine_dir)
    variants = (variant,) if variant else row.variants
    if row.format == "plan" and manifest.first(row.runtime, row.precision, variants, io) is None:
        raise ManifestError(
            f"{engine_dir}: no {row.precision} {io} plan for {row.name}: python -m export.tensorrt builds it"
        )
    entry = manifest.find(row.runtime, row.precision, variants, io)
    return OPENERS[row.runtime](Path(engine_dir) / entry.file, manifest, entry, row.device, threads)


def open_engine(
    engine_dir: str | Path,
    variant: str = "fp32",
    io: IoMode = "labels",
    backend: str = "onnxruntime",
    device: str = "auto",
    threads: int = 0,
) -> Engine:
    """The engine of `engine_dir` by the names of earlier versions: a graph variant (or OpenVINO's `bf16`) on a
    runtime; `device` picks ONNX Runtime's provider (auto, cpu, cuda, tensorrt) or TensorRT's GPU. A backend
    row's name (`ort.cpu.int8`) in `backend` opens that row."""
    if backend in BACKENDS:
        return open_backend(engine_dir, backend, io, threads)
    if backend not in RUNTIMES:
        raise ValueError(f"unknown backend '{backend}': a runtime ({', '.join(RUNTIMES)}) or {', '.join(BACKENDS)}")
    if Path(engine_dir).suffix == ".onnx":  # a lone ONNX file describes itself
        if backend != "onnxruntime":
            raise ValueError(f"{engine_dir}: a lone ONNX file runs on onnxruntime only (TensorRT plans need their dir)")
        manifest, entry = onnx_manifest(engine_dir)
        return OnnxRuntimeEngine(engine_dir, device, threads, manifest, entry)
    manifest = read_manifest(engine_dir)
    precision = "bf16" if variant == "bf16" else PRECISION.get(variant, variant)
    graph = "fp32" if variant == "bf16" else variant
    entry = manifest.find(backend, precision, (graph,), io)
    return OPENERS[backend](Path(engine_dir) / entry.file, manifest, entry, device, threads)


def onnx_manifest(path: str | Path) -> tuple[Manifest, EngineEntry]:
    """The one-engine manifest an exported ONNX file carries in its metadata (no engine dir needed)."""
    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is read
    options.log_severity_level = 3
    try:
        meta = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as e:  # ONNX Runtime raises its own types, all bare Exception subclasses
        raise ManifestError(f"{path}: not an ONNX model ONNX Runtime can open ({e})") from None
    raw = meta.custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise ManifestError(f"{path}: no '{METADATA_KEY}' metadata (not exported by segdeploy): open its engine dir")
    try:
        manifest = parse_manifest(json.loads(raw), f"{path} metadata")
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: unreadable '{METADATA_KEY}' metadata ({e})") from None
    (entry,) = manifest.engines
    return manifest, entry
