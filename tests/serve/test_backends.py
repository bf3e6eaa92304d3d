"""The backend table is the one source of what runs an engine: every stage reads it, old manifests still load."""

from __future__ import annotations

import dataclasses
import json

import pytest

from serve.backends import BACKENDS, RUNTIMES, backend_named, legacy, usable
from serve.manifest import read_manifest
from serve.runtime import OPENERS, _gpu


def test_every_backend_has_a_known_runtime_and_every_runtime_one_opener():
    assert set(OPENERS) == set(RUNTIMES)
    for b in BACKENDS.values():
        assert b.runtime in RUNTIMES and b.format in ("onnx", "plan") and b.variants, b
        assert b.name.split(".")[-1] == b.precision  # the name says its precision


def test_the_bench_and_predict_take_their_backends_from_the_table(capsys):
    from benchmarks.bench import ROWS, TORCH
    from serve.predict import main

    assert [*TORCH, *BACKENDS] == ROWS  # the bench times the PyTorch rows and the table's, nothing else
    assert main(["--engines", "nowhere", "--out", "x", "--backend", "ort.cpu.int4", "in.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    here = ", ".join(b.name for b in usable())
    assert err == [f"error: unknown backend 'ort.cpu.int4': this host runs {here}"]  # one line, from the table


def test_a_backend_this_host_cannot_run_is_refused_in_one_line_naming_those_it_can():
    with pytest.raises(ValueError, match=r"^backend trt.fp16 cannot run here \(tensorrt is not installed.*this host"):
        backend_named("trt.fp16")
    assert backend_named("ort.cpu.fp32") is BACKENDS["ort.cpu.fp32"]


def test_the_flags_of_earlier_versions_name_a_row():
    assert legacy("int8.qdq", "onnxruntime", "cpu").name == "ort.cpu.int8"
    assert legacy("fp16", "onnxruntime", "cuda").name == "ort.cuda.fp16"
    assert legacy("bf16", "openvino").name == "ov.bf16" and legacy("int8.cpu", "openvino").name == "ov.int8"
    assert legacy("fp32", "onnxruntime", "auto").name == "ort.cpu.fp32"  # this host has no GPU provider


def test_a_gpu_runtime_refuses_a_cpu_device_naming_what_it_takes():
    assert _gpu("auto") == 0 and _gpu("cuda:1") == 1 and _gpu("2") == 2
    with pytest.raises(ValueError, match="the tensorrt runtime runs on a GPU: device 'cpu' is not auto, cuda"):
        _gpu("cpu")


SCHEMA_1 = {  # an engine dir's manifest as versions before the backend table wrote it
    "schema": 1, "student": "cnn", "arch": "deeplabv3plus", "backbone": "resnet18", "classes": ["a", "b"],
    "palette": [[0, 0, 0], [255, 0, 0]], "preprocess": {"mean": [0.5] * 3, "std": [0.5] * 3}, "source": {},
    "shapes": {"min": [1, 32, 32], "opt": [1, 64, 64], "max": [4, 128, 128]}, "exporter": {},
    "engines": [
        {"file": "model.fp32.onnx", "format": "onnx", "io": "labels", "variant": "fp32", "precision": "fp32",
         "target": "any"},
        {"file": "model.fp32.onnx", "format": "openvino", "io": "labels", "variant": "bf16", "precision": "bf16",
         "target": "cpu", "openvino": {"cpu": "x"}},
        {"file": "model.int8.qdq.plan", "format": "plan", "io": "labels", "variant": "int8.qdq",
         "precision": "int8", "target": "tensorrt", "tensorrt": {"version": "10.3"}},
    ],
    "skipped": [{"variant": "int8.cpu", "backend": "openvino", "reason": "slow"},
                {"variant": "fp16", "backend": "onnx", "reason": "failed"}],
}  # fmt: skip


def test_a_manifest_written_before_the_table_still_loads(tmp_path):
    for name in ("model.fp32.onnx", "model.int8.qdq.plan"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps(SCHEMA_1))
    m = read_manifest(tmp_path)
    assert [(e.format, e.runtime, e.device, e.variant, e.precision) for e in m.engines] == [
        ("onnx", "onnxruntime", "any", "fp32", "fp32"),
        ("onnx", "openvino", "cpu", "fp32", "bf16"),  # the fp32 graph, run by OpenVINO at bf16
        ("plan", "tensorrt", "cuda", "int8.qdq", "int8"),
    ]
    ov_bf16, trt_int8 = BACKENDS["ov.bf16"], BACKENDS["trt.int8"]
    assert m.find(ov_bf16.runtime, ov_bf16.precision, ov_bf16.variants).file == "model.fp32.onnx"
    assert m.find(trt_int8.runtime, trt_int8.precision, trt_int8.variants).file == "model.int8.qdq.plan"
    assert m.left_out("openvino", "int8", ("int8.cpu",)) == "slow"
    assert m.left_out("onnxruntime", "fp16", ("fp16",)) == "failed"


def test_onnx_runtimes_gpu_providers_compute_in_the_engines_precision(tmp_path):
    """The CUDA provider's default is TF32 for fp32 convolutions and GEMMs: an fp32 engine asks for strict
    fp32. The TensorRT provider gets the fp16 flag only from builds that link TensorRT 10 (11 ignores it)."""
    from serve.runtime import provider_list

    for name in ("model.fp32.onnx", "model.int8.qdq.plan"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps(SCHEMA_1))
    m = read_manifest(tmp_path)
    fp32 = m.engines[0]
    fp16 = dataclasses.replace(fp32, variant="fp16", precision="fp16", file="model.fp16.onnx")
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(cuda, "m.onnx", m, fp32, "1.31.1") == [("CUDAExecutionProvider", {"use_tf32": "0"}), cuda[1]]
    assert provider_list(cuda, "m.onnx", m, fp16, "1.31.1")[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})
    measured = provider_list(cuda, "m.onnx", m, fp16, "1.31.1", {"enable_cuda_graph": "1"})[0][1]
    assert measured == {"use_tf32": "1", "enable_cuda_graph": "1"}  # a measurement's options over serve's
    trt = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    old, new = (provider_list(trt, "m.onnx", m, fp16, v)[0][1] for v in ("1.22.0", "1.31.1"))
    assert old["trt_fp16_enable"] == "True" and "trt_fp16_enable" not in new
    assert new["trt_profile_max_shapes"] == "image:4x128x128x3"
    assert provider_list(["CPUExecutionProvider"], "m.onnx", m, fp32, "1.31.1") == ["CPUExecutionProvider"]
