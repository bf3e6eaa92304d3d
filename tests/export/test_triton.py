"""The Triton model repository, checked with Triton's own ModelConfig protobuf against the ONNX files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.triton import COMBINE, PREPROCESS, RepositoryOptions, main, write_repository
from serve.manifest import read_manifest
from serve.segmenter import load_segmenter

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _check_against_onnx(config, model_file):
    graph = onnx.load(str(model_file), load_external_data=False).graph
    for tensors, value_infos in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in tensors] == [v.name for v in value_infos]
        for tensor, value in zip(tensors, value_infos, strict=True):
            assert model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TYPES[value.type.tensor_type.elem_type]
            onnx_dims = value.type.tensor_type.shape.dim
            assert len(tensor.dims) == len(onnx_dims) - 1  # Triton's batch dim is implicit
            for triton_dim, onnx_dim in zip(tensor.dims, onnx_dims[1:], strict=True):
                assert triton_dim == (onnx_dim.dim_value if onnx_dim.HasField("dim_value") else -1)


def _check_ensemble(config, configs):
    """Every step's model exists, and each tensor it reads is the ensemble's input or an earlier step's output."""
    available = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    for step in config.ensemble_scheduling.step:
        member = configs[step.model_name]
        inputs = {t.name: (t.data_type, list(t.dims)) for t in member.input}
        assert set(step.input_map) == set(inputs), step.model_name
        for key, tensor in step.input_map.items():
            assert available[tensor] == inputs[key], f"{step.model_name}.{key} <- {tensor}"
        outputs = {t.name: (t.data_type, list(t.dims)) for t in member.output}
        available |= {tensor: outputs[key] for key, tensor in step.output_map.items()}
    for t in config.output:
        assert available[t.name] == (t.data_type, list(t.dims))


def test_every_config_parses_and_matches_its_onnx(exported_run, tmp_path):
    out = tmp_path / "triton"
    names = write_repository(exported_run / "export", out)
    engines = [e for s in ("cnn", "vit") for e in read_manifest(exported_run / "export" / s).engines]
    # TensorRT's graph: on GPU its plan serves it; OpenVINO engines are their ONNX models of onnxruntime_onnx
    shipped = [e for e in engines if e.variant != "int8.qdq" and e.runtime != "openvino"]
    ensembles = sorted(n for n in names if n.startswith("ensemble_") and n not in (PREPROCESS, COMBINE))
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert len(names) == len(shipped) + 2 + len(ensembles) and ensembles == ["ensemble_fp16", "ensemble_fp32"]
    max_batch = read_manifest(exported_run / "export" / "cnn").shapes["max"][0]
    configs = {name: _parse(out / name / "config.pbtxt") for name in names}
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size == max_batch
        if name in ensembles:
            assert config.platform == "ensemble"
            _check_ensemble(config, configs)
            continue
        assert config.platform == "onnxruntime_onnx" and config.HasField("dynamic_batching")
        expected_kind = "KIND_CPU" if "int8_cpu" in name else "KIND_GPU"
        assert "int8_qdq" not in name
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == expected_kind
        _check_against_onnx(config, out / name / "1" / "model.onnx")
    assert {"cnn_fp32", "vit_fp32_logits"} <= set(names)
    assert [s.model_name for s in configs["ensemble_fp32"].ensemble_scheduling.step] == [
        PREPROCESS, "cnn_fp32_logits", "vit_fp32_logits", COMBINE,
    ]  # fmt: skip


def test_the_ensemble_graphs_compute_the_local_ensemble(exported_run, tmp_path):
    """preprocess -> both students' logits engines -> combine, run here with ONNX Runtime as Triton's ensemble
    runs them, gives the local segmenter's ensemble."""
    import onnxruntime as ort

    engines = exported_run / "export"
    out = tmp_path / "triton"
    write_repository(engines, out, RepositoryOptions(variants=("fp32",), python_backend=True))
    assert (out / "cnn_fp32" / "1" / "model.py").is_file() and (out / "ensemble_fp32" / "1").is_dir()
    assert 'backend: "python"' in (out / COMBINE / "config.pbtxt").read_text()

    def run(model: str, feeds: dict) -> list[np.ndarray]:
        return ort.InferenceSession(str(out / model / "1" / "model.onnx")).run(None, feeds)

    images = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    (normalised,) = run(PREPROCESS, {"image": images})
    logits = {s: run(f"{s}_fp32_logits", {"image": normalised})[0] for s in ("cnn", "vit")}
    (labels,) = run(COMBINE, logits)
    local = load_segmenter(engines, "ensemble", "ort.cpu.fp32").predict_batch(list(images))
    assert labels.dtype == np.uint8 and (labels == np.stack([p.labels for p in local])).mean() >= 0.999


def test_cli_filters_variants_and_forces_cpu(exported_run, tmp_path, capsys):
    out = tmp_path / "repo"
    args = ["--run", str(exported_run), "--out", str(out), "--variants", "fp32", "--cpu", "--instances", "2"]
    assert main([*args, "--io", "labels"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cnn_fp32", "vit_fp32"]  # no logits models: no ensemble
    config = _parse(out / "cnn_fp32" / "config.pbtxt")
    assert config.instance_group[0].count == 2
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert "tritonserver --model-repository" in capsys.readouterr().out
    # Nothing matches: exit 2, and the previous repository is left as it was.
    assert main(["--run", str(exported_run), "--out", str(out), "--variants", "int4"]) == 2
    assert (out / "cnn_fp32" / "config.pbtxt").is_file()


def test_plans_for_another_tensorrt_are_left_out_and_cpu_repos_hold_the_qdq_graph(exported_run, tmp_path, caplog):
    import shutil

    from serve.manifest import EngineEntry, write_manifest

    root = tmp_path / "export"
    shutil.copytree(exported_run / "export", root)
    for student in ("cnn", "vit"):
        manifest = read_manifest(root / student)
        for release in ("10.16.0", "10.8.0"):
            plan = f"model.fp32.{release}.plan"
            (root / student / plan).write_bytes(b"plan")
            built = {"version": release, "gpu": "NVIDIA L4", "compute_capability": "8.9"}
            manifest.engines.append(EngineEntry(plan, "plan", "labels", "fp32", "fp32", "tensorrt", tensorrt=built))
        write_manifest(manifest, root / student)
    names = write_repository(root, tmp_path / "gpu", RepositoryOptions(tensorrt="10.16.0"))
    plans = sorted(n for n in names if n.endswith("_trt"))
    assert len(plans) == 2 and all((tmp_path / "gpu" / n / "1" / "model.plan").is_file() for n in plans)
    assert "built for TensorRT 10.8.0, the server runs 10.16.0" in caplog.text
    other_gpu = write_repository(
        root, tmp_path / "h100", RepositoryOptions(tensorrt="10.16.0", compute_capability="9.0")
    )
    assert not any(n.endswith("_trt") for n in other_gpu)  # every plan here was built for a compute 8.9 GPU
    assert "built for a NVIDIA L4 (compute 8.9), the server's GPU is compute 9.0" in caplog.text
    cpu = write_repository(root, tmp_path / "cpu", RepositoryOptions(cpu_only=True))
    assert {"cnn_int8_qdq", "vit_int8_qdq"} <= set(cpu) and not any(n.endswith("_trt") for n in cpu)
    config = _parse(tmp_path / "cpu" / "cnn_int8_qdq" / "config.pbtxt")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
