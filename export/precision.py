"""Reduced precision written into the ONNX graph (TensorRT 11 only follows the graph's types).

- fp16: mixed precision with fp32 I/O; the final resize stays fp32 (onnxconverter-common's converter with a
  block list: `--fp16-keep-fp32` adds op types to it).
- int8.qdq: symmetric int8 Q/DQ, per-channel weights, for TensorRT (ONNX Runtime quantize_static).
- int8.cpu: Q/DQ with asymmetric uint8 activations and symmetric per-channel int8 weights, for the
  CPU runtimes: ONNX Runtime's and OpenVINO's int8 kernels both read it (OpenVINO on the symmetric
  int8.qdq graph failed the parity gate: 94.7 % agreement for the CNN, 99.5 % on this one).
Both int8 variants are calibrated on real training images (activation ranges at the 99.99th percentile).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

# Op types the fp16 graph keeps in fp32: the last op, the resize of the logits to full resolution (compared against
# fp32 by the gate). Normalisation and softmax run in fp16, their kernels accumulating in fp32: keeping them in fp32
# put 76 Cast nodes in the ViT and made it 1.49x slower on ONNX Runtime CUDA at 1024x2048 (13.0 vs 8.7 ms, H200), with
# the same class maps (benchmarks/results/gpu-h200-2026-12-04.md). The gate still refuses a student they overflow.
FP16_KEEP_FP32 = ["Resize"]


def to_fp16(model: onnx.ModelProto, keep_fp32: list[str] = FP16_KEEP_FP32) -> onnx.ModelProto:
    """The fp16 graph, with fp32 I/O and the `keep_fp32` op types in fp32 (Cast nodes around each)."""
    import warnings

    from onnxconverter_common import float16

    convert = lambda m: float16.convert_float_to_float16(  # noqa: E731
        m, keep_io_types=True, op_block_list=keep_fp32 + list(float16.DEFAULT_OP_BLOCK_LIST)
    )
    with warnings.catch_warnings():  # one warning per tiny weight flushed to fp16's smallest value
        warnings.simplefilter("ignore", UserWarning)
        try:
            converted = convert(model)
        except ValueError as e:  # its cast clean-up refuses some graphs whose output a kept op makes
            log.info("fp16: %s; converting again with an Identity before each output (in fp16)", e)
            converted = convert(_identity_outputs(model))
    _fp32_outputs(converted)
    # The converter leaves the fp32 value_info of re-typed tensors beside the new one; re-infer.
    del converted.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(converted)


def _identity_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose outputs each come out of an Identity node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for output in out.graph.output:
        node = next(n for n in out.graph.node if output.name in n.output)
        node.output[list(node.output).index(output.name)] = f"{output.name}_before_identity"
        out.graph.node.append(onnx.helper.make_node("Identity", [f"{output.name}_before_identity"], [output.name]))
    return out


def _fp32_outputs(model: onnx.ModelProto) -> None:
    """keep_io_types misses outputs made by a blocked (fp32) op: it casts them to fp16 on the way
    out. Turn that last cast back into fp32 (or add one), so the manifest's fp32 output holds."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for output in model.graph.output:
        tensor = output.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers[output.name]
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT
        else:
            half = f"{output.name}_fp16"
            node.output[list(node.output).index(output.name)] = half
            model.graph.node.append(onnx.helper.make_node("Cast", [half], [output.name], to=onnx.TensorProto.FLOAT))
        tensor.elem_type = onnx.TensorProto.FLOAT


# Only the compute-heavy ops; normalisation, softmax and resize stay fp32 between them.
INT8_OPS = ["Conv", "MatMul", "Gemm"]
# Activation ranges cut at this percentile of the calibration histogram (0.005 % of values clipped on each side):
# the demo's worst agreement over the gate's sizes, int8.cpu, ONNX Runtime / OpenVINO, against MinMax: CNN
# 98.17 / 98.04 -> 98.91 / 99.00, ViT 98.78 / 96.34 -> 99.11 / 96.83 (99.999: CNN 98.77 / 98.82; Entropy: as MinMax;
# benchmarks/results/precision-cpu.md).
CALIB_PERCENTILE = 99.99


def patchify_convs(model: onnx.ModelProto) -> list[str]:
    """The convolutions whose kernel equals their stride (> 1): non-overlapping patches, as SegFormer's sequence
    reduction. The CPU int8 graph keeps them fp32: OpenVINO's int8 kernels got them wrong on small inputs (the
    demo ViT at 32x32: 96.8 % agreement, 99.0 % with them fp32; ONNX Runtime 99.1 % either way)."""

    def ints(node, name: str) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == name), [])

    def patchify(node) -> bool:
        kernel = ints(node, "kernel_shape")
        return node.op_type == "Conv" and kernel == ints(node, "strides") and max(kernel, default=1) > 1

    return [n.name for n in model.graph.node if patchify(n)]


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a list of input batches, read in ranges (`set_range`:
    the calibrator takes its statistics one range at a time, holding only that range's activations)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = list(batches)
        self._batches = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}


def to_int8(model: onnx.ModelProto, batches: list[np.ndarray], variant: str, keep_fp32: Iterable[str] = ()
            ) -> onnx.ModelProto:  # fmt: skip
    """`int8.qdq` (TensorRT: symmetric, zero point 0) or `int8.cpu` (CPU runtimes: u8 asymmetric, s8); the nodes
    named in `keep_fp32` stay fp32."""
    if variant not in ("int8.qdq", "int8.cpu"):
        raise ValueError(f"unknown int8 variant '{variant}'")
    keep_fp32 = [*keep_fp32, *(patchify_convs(model) if variant == "int8.cpu" else [])]
    quiet = logging.getLogger()  # the quantizer logs a warning per non-float tensor on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
            return _quantize(model, batches, variant == "int8.qdq", keep_fp32)
    finally:
        quiet.setLevel(level)


def _quantize(model: onnx.ModelProto, batches: list[np.ndarray], symmetric: bool, keep_fp32: list[str]
              ) -> onnx.ModelProto:  # fmt: skip
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, prepared, out = Path(tmp) / "fp32.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src))
        # Shape inference and graph clean-up first, as ONNX Runtime's quantization guide recommends.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _Calibration(model.graph.input[0].name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            op_types_to_quantize=INT8_OPS,
            nodes_to_exclude=keep_fp32,
            # QuantizeBias=False keeps biases in float: TensorRT's parser takes only 8-bit Q/DQ inputs,
            # and ONNX Runtime would quantize them to INT32 behind a DequantizeLinear.
            extra_options={
                "ActivationSymmetric": symmetric,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                # one image's activations at a time, histograms merged: memory of one image, any sizes
                "CalibPercentile": CALIB_PERCENTILE,
                "CalibStridedMinMax": 1,
            },
        )
        return onnx.load_model(str(out))


def worst_tensors(int8_path: Path, fp32_path: Path, x: np.ndarray, count: int) -> list[dict]:
    """The `count` quantized activations of the int8 graph with the lowest signal-to-quantization-noise ratio of
    their own Q/DQ pair on `x` (dB; and against the fp32 graph's same tensor, the error accumulated up to it), with
    the quantized ops that read each."""
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    graph = onnx.load(str(int8_path), load_external_data=False).graph  # its input is the fp32 graph's too

    def activations(path: Path) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            augmented = Path(tmp) / "augmented.onnx"
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            return collect_activations(str(augmented), [{graph.input[0].name: x}])

    matching = create_activation_matching(activations(int8_path), activations(fp32_path))
    readers: dict[str, list[str]] = {}
    for node in (n for n in graph.node if n.op_type in INT8_OPS):
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node.name)
    rows = []
    for name, match in matching.items():
        nodes = [n for suffix in ("", "_1") for n in readers.get(f"{name}_DequantizeLinear_Output{suffix}", [])]
        if not nodes or match.get("pre_qdq") is None or match.get("post_qdq") is None:
            continue
        row = {"tensor": name, "read_by": nodes, "qdq_sqnr_db": compute_signal_to_quantization_noice_ratio(
            match["pre_qdq"], match["post_qdq"])}  # fmt: skip
        if match.get("float"):
            row["sqnr_vs_fp32_db"] = compute_signal_to_quantization_noice_ratio(match["float"], match["post_qdq"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["qdq_sqnr_db"])[:count]
