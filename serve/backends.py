"""The backend table: one row per way of running an engine, and the probes of what this host can run.

A backend is a runtime on a device at a precision (`ort.cpu.fp32`, `ov.int8`, `trt.fp16`): the name users
type (`serve.predict --backend`, the app, the Triton host) and the bench times. It opens one engine file of
an engine dir: the first of its graph variants the export shipped for that runtime and precision. Every
stage reads this table (docs/architecture.md, "Adding a backend"): export, the bench, the apps and the Triton
repository keep no list of their own.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib import metadata


@dataclass(frozen=True)
class Backend:
    name: str
    runtime: str  # onnxruntime | openvino | tensorrt
    device: str  # cpu | cuda | tensorrt (ONNX Runtime's TensorRT execution provider)
    precision: str  # fp32 | fp16 | bf16 | int8: what it computes in
    variants: tuple[str, ...]  # the graph variants it runs, in order of preference
    format: str = "onnx"  # the engine file it opens: onnx | plan


@dataclass(frozen=True)
class Runtime:
    name: str
    modules: tuple[str, ...]  # what must import
    install: str  # what to install when it does not


RUNTIMES = {
    r.name: r
    for r in [
        Runtime("onnxruntime", ("onnxruntime",), "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"),
        Runtime("openvino", ("openvino",), "pip install 'segdeploy[openvino]'"),
        Runtime(
            "tensorrt",
            ("tensorrt", "pycuda"),
            "pip install -e '.[gpu,trt]' --extra-index-url https://pypi.nvidia.com (pycuda builds against CUDA_ROOT)",
        ),
    ]
}

BACKENDS = {
    b.name: b
    for b in [
        Backend("ort.cpu.fp32", "onnxruntime", "cpu", "fp32", ("fp32",)),
        Backend("ort.cpu.fp16", "onnxruntime", "cpu", "fp16", ("fp16",)),
        # the CPU int8 graph (asymmetric uint8 activations), else TensorRT's symmetric one
        Backend("ort.cpu.int8", "onnxruntime", "cpu", "int8", ("int8.cpu", "int8.qdq")),
        Backend("ort.cuda.fp32", "onnxruntime", "cuda", "fp32", ("fp32",)),
        Backend("ort.cuda.fp16", "onnxruntime", "cuda", "fp16", ("fp16",)),
        Backend("ort.trt.fp32", "onnxruntime", "tensorrt", "fp32", ("fp32",)),
        Backend("ort.trt.fp16", "onnxruntime", "tensorrt", "fp16", ("fp16",)),
        Backend("ort.trt.int8", "onnxruntime", "tensorrt", "int8", ("int8.qdq",)),
        Backend("trt.fp32", "tensorrt", "cuda", "fp32", ("fp32",), "plan"),
        Backend("trt.fp16", "tensorrt", "cuda", "fp16", ("fp16",), "plan"),
        Backend("trt.int8", "tensorrt", "cuda", "int8", ("int8.qdq",), "plan"),
        Backend("ov.fp32", "openvino", "cpu", "fp32", ("fp32",)),
        Backend("ov.bf16", "openvino", "cpu", "bf16", ("fp32",)),  # the fp32 graph at bf16, where native
        Backend("ov.int8", "openvino", "cpu", "int8", ("int8.cpu",)),
    ]
}
# ONNX Runtime's execution provider per device, and the order `auto` tries them in
ORT_PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


ORT_WHEELS = ("onnxruntime", "onnxruntime-gpu")  # both install the one `onnxruntime` module


def installed_onnxruntime_wheels() -> list[str]:
    found = []
    for wheel in ORT_WHEELS:
        try:
            metadata.version(wheel)
            found.append(wheel)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime():
    """The `onnxruntime` module, refusing an environment where both wheels overwrite each other
    (the result is a CPU-only or broken module, whichever was installed last)."""
    wheels = installed_onnxruntime_wheels()
    if len(wheels) > 1:
        raise RuntimeError(
            "both onnxruntime and onnxruntime-gpu are installed and overwrite the same module; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (GPU) or onnxruntime (CPU)"
        )
    import onnxruntime

    return onnxruntime


def runtime_problem(runtime: str) -> str | None:
    """Why `runtime` cannot run on this host (None: it can): the one availability probe per runtime."""
    spec = RUNTIMES[runtime]
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    return f"{runtime} is not installed here ({', '.join(missing)} missing): {spec.install}" if missing else None


@cache
def _ort_providers() -> tuple[str, ...]:
    return tuple(import_onnxruntime().get_available_providers())


@cache
def _openvino_precisions() -> tuple[str, ...]:
    from serve.openvino import capabilities

    return tuple(capabilities()["precisions"])


def problem(backend: Backend) -> str | None:
    """Why this host cannot run `backend` (None: it can): its runtime, then its device or precision."""
    if why := runtime_problem(backend.runtime):
        return why
    if backend.runtime == "onnxruntime" and ORT_PROVIDERS[backend.device] not in _ort_providers():
        return f"ONNX Runtime here has no {ORT_PROVIDERS[backend.device]} (it has {', '.join(_ort_providers())})"
    if backend.runtime == "openvino" and backend.precision == "bf16" and "BF16" not in _openvino_precisions():
        return "this CPU computes no bf16 natively (OpenVINO would emulate it)"
    return None


def usable() -> list[Backend]:
    """The backends this host can run, in the table's order."""
    return [b for b in BACKENDS.values() if problem(b) is None]


def backend_named(name: str) -> Backend:
    """The row called `name`; an unknown or unrunnable one fails in one line listing what this host runs."""
    here = ", ".join(b.name for b in usable())
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}': this host runs {here}")
    if why := problem(BACKENDS[name]):
        raise ValueError(f"backend {name} cannot run here ({why}): this host runs {here}")
    return BACKENDS[name]


def legacy(variant: str, runtime: str, device: str = "auto") -> Backend:
    """The row that the flags of earlier versions name: a graph variant, a runtime and an ONNX Runtime device
    (`auto`: TensorRT, CUDA, then the CPU, the first this host has). OpenVINO's `bf16` variant is its row."""
    precision = {"int8.qdq": "int8", "int8.cpu": "int8"}.get(variant, variant)
    rows = [b for b in BACKENDS.values() if b.runtime == runtime and b.precision == precision]
    if runtime == "onnxruntime":
        order = list(ORT_PROVIDERS) if device == "auto" else [device]
        rows = sorted((b for b in rows if b.device in order), key=lambda b: order.index(b.device))
        rows = [b for b in rows if variant in b.variants or precision == variant]
    if not rows:
        raise ValueError(f"no backend runs the {variant} engines on {runtime} ({device}): see {', '.join(BACKENDS)}")
    return next((b for b in rows if problem(b) is None), rows[0])
