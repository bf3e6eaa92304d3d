"""The OpenVINO backend on a real exported run: gated engines, explicit precision, refusals that name the fix."""

from __future__ import annotations

import numpy as np
import pytest

from serve.manifest import read_manifest
from serve.runtime import open_engine
from serve.segmenter import choices, load_segmenter

openvino_module = pytest.importorskip("openvino", reason="the openvino extra is not installed")
from serve.openvino import OpenVinoEngine, OpenVinoUnavailable, capabilities, check_host  # noqa: E402

HOST = capabilities()
NATIVE_BF16 = "BF16" in HOST["precisions"]


def _pixels(n=3, h=45, w=77, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_openvino_engines_are_gated_and_record_the_cpu(engines, student):
    manifest = read_manifest(engines / student)
    ov = [e for e in manifest.engines if e.runtime == "openvino"]
    ov_skipped = {s["precision"]: s["reason"] for s in manifest.skipped if s["runtime"] == "openvino"}
    # every OpenVINO row is shipped or listed with why: bf16 where the CPU lacks it, int8 where it did not pay
    assert {e.precision for e in ov} | set(ov_skipped) == {"fp32", "bf16", "int8"} and "fp32" in {
        e.precision for e in ov
    }
    if not NATIVE_BF16:
        assert ov_skipped["bf16"].endswith("computes no bf16 natively")
    for e in ov:
        assert e.parity["passed"] and e.openvino == HOST and e.device == "cpu" and e.format == "onnx"
        source = "model.int8.cpu" if e.precision == "int8" else "model.fp32"  # bf16: the fp32 file at bf16
        assert (engines / student / e.file).is_file() and e.file.startswith(source)


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_openvino_fp32_agrees_with_onnx_runtime_on_the_same_graph(engines, student):
    pixels = _pixels()
    ort = open_engine(engines / student, "fp32", "logits", "onnxruntime", "cpu").run
    ov = open_engine(engines / student, "fp32", "logits", "openvino").run
    x = ((pixels.astype(np.float32) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]).astype(np.float32)
    x = x.transpose(0, 3, 1, 2).copy()
    a, b = ort(x), ov(x)
    assert a.shape == b.shape == (3, 5, 45, 77)
    np.testing.assert_allclose(b, a, atol=1e-3, rtol=1e-3)  # f32 really: bf16 would be ~1e-2 off
    labels_ort = open_engine(engines / student, "fp32", "labels", "onnxruntime", "cpu").run(pixels)
    labels_ov = open_engine(engines / student, "fp32", "labels", "openvino").run(pixels)
    assert (labels_ov == labels_ort).mean() >= 0.999  # the gate's fp32 agreement


def hint(compiled) -> str:
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def test_the_precision_asked_for_is_the_one_compiled(engines):
    fp32 = open_engine(engines / "cnn", "fp32", "labels", "openvino")
    assert hint(fp32.for_shape((1, 32, 48, 3))) == "f32" and fp32.precision == "f32"
    if NATIVE_BF16:
        bf16 = open_engine(engines / "cnn", "bf16", "labels", "openvino")
        assert hint(bf16.for_shape((1, 32, 48, 3))) == "bf16"
    # int8: its float ops at bf16 where the CPU has it natively, else f32 (never emulated). Any graph shows the
    # hint; whether the export shipped the int8 engine depends on its timing.
    int8 = OpenVinoEngine(engines / "cnn" / "model.fp32.onnx", "int8")
    assert hint(int8.for_shape((1, 32, 48, 3))) == int8.precision == ("bf16" if NATIVE_BF16 else "f32")
    assert int8.device == "openvino.int8"


def test_each_input_shape_runs_its_own_static_compile_and_only_the_last_few_are_kept(engines, monkeypatch):
    monkeypatch.setattr("serve.openvino.SHAPES_KEPT", 2)
    engine = open_engine(engines / "vit", "fp32", "labels", "openvino")
    reference = open_engine(engines / "vit", "fp32", "labels", "onnxruntime", "cpu")
    for shape in [(1, 32, 48, 3), (2, 40, 40, 3), (1, 32, 48, 3), (1, 40, 72, 3), (2, 40, 40, 3)]:
        pixels = _pixels(shape[0], shape[1], shape[2], seed=sum(shape))
        assert (engine.run(pixels) == reference.run(pixels)).mean() >= 0.999
        compiled = engine.for_shape(shape)
        assert list(compiled.inputs[0].get_shape()) == list(shape)  # static, not the dynamic graph
    assert list(engine._by_shape) == [(1, 40, 72, 3), (2, 40, 40, 3)]  # least recently used dropped


def test_bf16_is_refused_where_the_cpu_lacks_it_and_engines_from_another_cpu_name_the_fix():
    no_bf16 = {"cpu": "Old CPU", "precisions": ["FP32", "INT8"], "openvino": HOST["openvino"]}
    with pytest.raises(OpenVinoUnavailable, match=r"needs native BF16 .* Old CPU lacks .* use --backend ov.fp32"):
        check_host("bf16", None, no_bf16)
    with pytest.raises(OpenVinoUnavailable, match=r"gated on Other CPU, this host is .* re-export on this host"):
        check_host("int8", {"cpu": "Other CPU"}, {**HOST, "precisions": ["FP32", "INT8", "BF16"]})
    check_host("fp32", {"cpu": "Other CPU"}, no_bf16)  # f32 runs anywhere


def test_the_segmenter_offers_openvino_and_it_matches_onnx_runtime(engines):
    offered = {(m, b.name) for m, b in choices(engines)}
    assert ("cnn", "ov.fp32") in offered and ("ensemble", "ov.fp32") in offered
    image = _pixels(1, 60, 44, seed=3)[0]
    ov = load_segmenter(engines, "ensemble", "ov.fp32").predict(image).labels
    ort = load_segmenter(engines, "ensemble", "ort.cpu.fp32").predict(image).labels
    assert (ov == ort).mean() >= 0.999


def test_an_unknown_precision_is_refused(engines):
    with pytest.raises(ValueError, match="no OpenVINO engine at precision 'fp16'"):
        OpenVinoEngine(engines / "cnn" / "model.fp16.onnx", "fp16")
