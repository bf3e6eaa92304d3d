"""OpenVINO on the CPU: the engine dir's ONNX files, compiled with an explicit inference precision.

The manifest lists OpenVINO engines with runtime `openvino`: an ONNX file of the engine dir and the
precision it runs at, gated at export like every engine (backends ov.fp32, ov.bf16, ov.int8):
- `fp32`: model.fp32.onnx with INFERENCE_PRECISION_HINT f32 (OpenVINO would otherwise pick bf16 on a
  CPU that has it: never silently);
- `bf16`: the same file with the bf16 hint, only where the CPU computes bf16 natively (AVX512-BF16, AMX);
- `int8`: the CPU int8 graph (model.int8.cpu.onnx: Q/DQ, uint8 activations), whose convolutions and matmuls
  OpenVINO runs as int8 kernels.
The compiled model's precision is read back and must be the one asked for. The graph is compiled for
each input shape it meets (static shapes: the ViT runs 1.9x faster than compiled once with dynamic
shapes; a compile takes 0.1-0.4 s), the last few shapes kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from serve.manifest import EngineEntry, Manifest

# OpenVINO's inference precision per engine precision. int8: int8 kernels where the graph has Q/DQ, and the
# float ops between them (the final resize, the argmax, pooling) at bf16 where the CPU computes it natively:
# CNN at 512x1024, batch 1, 57.9 -> 52.7 ms at the same agreement. The int8 engine is gated per CPU.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
SHAPES_KEPT = 8  # compiled models per engine, one per input shape, least recently used dropped (the gate: 1)


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


def check_host(precision: str, gated_on: dict | None, host: dict) -> None:
    """A precision this CPU lacks is refused, naming the fix (never run emulated or silently in f32)."""
    needs = {"bf16": "BF16", "int8": "INT8"}.get(precision)
    if needs and needs not in host["precisions"]:
        raise OpenVinoUnavailable(
            f"the OpenVINO {precision} engine needs native {needs} on the CPU, which {host['cpu']} lacks "
            f"(it has {', '.join(host['precisions'])}): use --backend ov.fp32"
        )
    if gated_on and gated_on.get("cpu") != host["cpu"] and precision != "fp32":
        raise OpenVinoUnavailable(
            f"this OpenVINO {precision} engine was gated on {gated_on.get('cpu')}, this host is {host['cpu']}: "
            "re-export on this host (python -m export --run RUN) so its parity is checked here, "
            "or use --backend ov.fp32"
        )


class OpenVinoEngine:
    """One compiled model per input shape and one infer request per thread (a request is not re-entrant)."""

    def __init__(
        self,
        model: str | Path,
        precision: str,
        threads: int = 0,
        manifest: Manifest | None = None,
        entry: EngineEntry | None = None,
        shapes_kept: int | None = None,
        check_at_load: bool = True,
    ) -> None:
        ov = import_openvino()
        if precision not in INFERENCE_PRECISION:
            raise ValueError(f"no OpenVINO engine at precision '{precision}' ({', '.join(INFERENCE_PRECISION)})")
        core = ov.Core()
        host = capabilities(core)
        check_host(precision, (entry.openvino if entry else None), host)
        self.manifest, self.entry, self.model = manifest, entry, str(model)
        self.precision = INFERENCE_PRECISION[precision]
        if precision == "int8" and "BF16" not in host["precisions"]:
            self.precision = "f32"
        self.device = f"openvino.{'int8' if precision == 'int8' else self.precision}"
        self.config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.core, self.graph = core, core.read_model(self.model)
        if check_at_load:  # it compiles, at the precision asked for: a server finds out at start, not at a request
            self.compile(None)
        self._by_shape: OrderedDict[tuple, object] = OrderedDict()
        self.shapes_kept = shapes_kept or SHAPES_KEPT  # compiled shapes kept
        self._lock = threading.Lock()
        self._local = threading.local()

    def compile(self, shape: tuple | None):
        graph = self.graph
        if shape is not None:
            graph = self.graph.clone()
            graph.reshape({graph.inputs[0]: list(shape)})
        compiled = self.core.compile_model(graph, "CPU", self.config)
        applied = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"
        if applied != self.precision:
            raise OpenVinoUnavailable(
                f"{self.model}: OpenVINO compiled it at {applied}, not the {self.precision} asked for"
            )
        return compiled

    def for_shape(self, shape: tuple):
        with self._lock:
            compiled = self._by_shape.get(shape)
            if compiled is None:
                compiled = self._by_shape[shape] = self.compile(shape)
                while len(self._by_shape) > self.shapes_kept:
                    self._by_shape.popitem(last=False)
            self._by_shape.move_to_end(shape)
            return compiled

    def run(self, batch: np.ndarray) -> np.ndarray:
        compiled = self.for_shape(batch.shape)
        requests = self._local.__dict__.setdefault("requests", {})
        request = requests.get(batch.shape)
        if request is None or request[0] is not compiled:  # new, or its shape was dropped and compiled again
            for stale in [k for k in requests if k not in self._by_shape]:
                del requests[stale]
            request = requests[batch.shape] = (compiled, compiled.create_infer_request())
        request[1].infer({0: np.ascontiguousarray(batch)})
        return request[1].get_output_tensor(0).data.copy()
