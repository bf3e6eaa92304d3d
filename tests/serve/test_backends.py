"""The backend table is the one source of what runs an engine: every stage reads it, old manifests still load."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from serve.backends import BACKENDS, RUNTIMES, Backend, backend_named, legacy, problem, runtime_problem, usable
from serve.manifest import read_manifest
from serve.runtime import OPENERS, _gpu


def test_every_backend_has_a_known_runtime_and_every_runtime_one_opener():
    assert set(OPENERS) == set(RUNTIMES)
    for b in BACKENDS.values():
        assert b.runtime in RUNTIMES and b.format in ("onnx", "plan") and b.variants, b
        assert b.name.split(".")[-1] == b.precision  # the name says its precision


NEW_ROW = Backend("ortalt.cpu.fp32", "onnxruntime", "cpu", "fp32", ("fp32",))  # a second way to run fp32 graphs


def test_a_row_added_to_the_table_reaches_export_predict_the_app_the_triton_host_and_the_bench(
    trained_run, tmp_path, monkeypatch
):
    """The architecture's promise: adding a backend is one row (and an opener, here ONNX Runtime's); every stage
    that runs or times engines picks it up with no list of its own."""
    from benchmarks.bench import main as bench
    from export.__main__ import main as export
    from serve.app import Demo
    from serve.predict import main as predict
    from serve.triton_server import model_name, segmenters
    from tests.conftest import TEST_EXPORT_ARGS

    monkeypatch.setitem(BACKENDS, NEW_ROW.name, NEW_ROW)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export", "bench", "checkpoint"))
    fp32 = ["--students", "cnn", "--variants", "fp32", "--no-openvino", "--no-size-sweep", *TEST_EXPORT_ARGS]
    assert export(["--run", str(run), *fp32]) == 0
    engines = run / "export"
    assert NEW_ROW.name in read_manifest(engines / "cnn").timings["ms"]  # timed beside ort.cpu.fp32

    photo = sorted((engines / "examples").glob("*.png"))[0]  # the export's own example images
    for backend in (NEW_ROW.name, "ort.cpu.fp32"):
        assert (
            predict(["--engines", str(engines), "--backend", backend, "--out", str(tmp_path / backend), str(photo)])
            == 0
        )
    masks = [np.asarray(Image.open(next((tmp_path / b).rglob("*.png")))) for b in (NEW_ROW.name, "ort.cpu.fp32")]
    assert np.array_equal(*masks)

    assert ("cnn", NEW_ROW.name) in Demo(engines).available
    assert model_name("cnn", NEW_ROW.name) in segmenters(engines, ["cnn"])
    out = tmp_path / "bench"
    args = ["--run", str(run), "--models", "cnn", "--backends", NEW_ROW.name, "--batch-sizes", "1"]
    assert bench([*args, "--sizes", "64x64", "--seconds", "0.2", "--eval-images", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "ok"), (NEW_ROW.name, "ok")]


def test_an_unknown_backend_is_refused_in_one_line_from_the_table(capsys):
    from serve.predict import main

    assert main(["--engines", "nowhere", "--out", "x", "--backend", "ort.cpu.int4", "in.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    here = ", ".join(b.name for b in usable())
    assert err == [f"error: unknown backend 'ort.cpu.int4': this host runs {here}"]  # one line, from the table


def test_a_backend_this_host_cannot_run_is_refused_in_one_line_naming_those_it_can():
    assert backend_named("ort.cpu.fp32") is BACKENDS["ort.cpu.fp32"]
    cannot = [b for b in BACKENDS.values() if problem(b)]
    if not cannot:
        pytest.skip("this host runs every backend of the table")
    here = ", ".join(b.name for b in usable())
    with pytest.raises(ValueError) as refused:
        backend_named(cannot[0].name)
    assert (
        str(refused.value) == f"backend {cannot[0].name} cannot run here ({problem(cannot[0])}): this host runs {here}"
    )
    if "trt.fp16" in (b.name for b in cannot) and runtime_problem("tensorrt"):
        assert "tensorrt is not installed here" in problem(BACKENDS["trt.fp16"])


def test_the_flags_of_earlier_versions_name_a_row():
    assert legacy("int8.qdq", "onnxruntime", "cpu").name == "ort.cpu.int8"
    assert legacy("fp16", "onnxruntime", "cuda").name == "ort.cuda.fp16"
    assert legacy("bf16", "openvino").name == "ov.bf16" and legacy("int8.cpu", "openvino").name == "ov.int8"
    auto = next(f"ort.{d}.fp32" for d in ("trt", "cuda", "cpu") if not problem(BACKENDS[f"ort.{d}.fp32"]))
    assert legacy("fp32", "onnxruntime", "auto").name == auto  # TensorRT, CUDA, then the CPU: the first this host runs


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
