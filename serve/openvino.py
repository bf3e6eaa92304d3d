"""OpenVINO on the CPU: the engine dir's ONNX files, compiled with an explicit inference precision.

The manifest lists OpenVINO engines with format `openvino`: an ONNX file of the engine dir and the
precision it runs at, gated at export like every engine:
- `fp32`: model.fp32.onnx with INFERENCE_PRECISION_HINT f32 (OpenVINO would otherwise pick bf16 on a
  CPU that has it: never silently);
- `bf16`: the same file with the bf16 hint, only where the CPU computes bf16 natively (AVX512-BF16, AMX);
- `int8.qdq`: the Q/DQ graph, whose int8 convolutions and matmuls OpenVINO runs as int8 kernels.
The compiled model's precision is read back and must be the one asked for.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from serve.manifest import EngineEntry, Manifest

VARIANT_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8.qdq": "f32"}  # int8.qdq: int8 kernels, f32 elsewhere


class OpenVinoUnavailable(RuntimeError):
    """OpenVINO is not installed, or this CPU cannot run the precision asked for."""


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise OpenVinoUnavailable(
            "the openvino backend needs the openvino package: pip install 'segdeploy[openvino]'"
        ) from None
    return openvino


def capabilities(core=None) -> dict:
    """This CPU as OpenVINO sees it: its name and the precisions it computes natively."""
    ov = import_openvino()
    core = core or ov.Core()
    return {
        "openvino": ov.__version__.split("-")[0],
        "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
        "precisions": sorted(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
    }


def check_host(variant: str, gated_on: dict | None, host: dict) -> None:
    """A precision this CPU lacks is refused, naming the fix (never run emulated or silently in f32)."""
    needs = {"bf16": "BF16", "int8.qdq": "INT8"}.get(variant)
    if needs and needs not in host["precisions"]:
        raise OpenVinoUnavailable(
            f"the OpenVINO {variant} engine needs native {needs} on the CPU, which {host['cpu']} lacks "
            f"(it has {', '.join(host['precisions'])}): use --variant fp32"
        )
    if gated_on and gated_on.get("cpu") != host["cpu"] and variant != "fp32":
        raise OpenVinoUnavailable(
            f"this OpenVINO {variant} engine was gated on {gated_on.get('cpu')}, this host is {host['cpu']}: "
            "re-export on this host (python -m export --run RUN) so its parity is checked here, or use --variant fp32"
        )


class OpenVinoEngine:
    """One compiled model and one infer request per thread (a request is not re-entrant)."""

    def __init__(
        self,
        model: str | Path,
        variant: str,
        threads: int = 0,
        manifest: Manifest | None = None,
        entry: EngineEntry | None = None,
    ) -> None:
        ov = import_openvino()
        if variant not in VARIANT_PRECISION:
            raise ValueError(f"no OpenVINO precision for variant '{variant}' ({', '.join(VARIANT_PRECISION)})")
        core = ov.Core()
        host = capabilities(core)
        check_host(variant, (entry.openvino if entry else None), host)
        self.manifest, self.entry, self.variant = manifest, entry, variant
        precision = VARIANT_PRECISION[variant]
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
        applied = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        if applied != precision:
            raise OpenVinoUnavailable(f"{model}: OpenVINO compiled it at {applied}, not the {precision} asked for")
        self.precision, self.device = applied, f"openvino.{applied}"
        self._local = threading.local()

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(batch)})
        return request.get_output_tensor(0).data.copy()
