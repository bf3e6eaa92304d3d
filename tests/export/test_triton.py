"""The Triton model repository, checked with Triton's own ModelConfig protobuf against the ONNX files."""

from __future__ import annotations

import onnx
import pytest

from export.triton import main, write_repository
from serve.manifest import read_manifest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

ONNX_TYPES = {onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _check_against_onnx(config, model_file):
    graph = onnx.load(str(model_file), load_external_data=False).graph
    for tensors, value_infos in ((config.input, graph.input), (config.output, graph.output)):
        assert len(tensors) == len(value_infos) == 1
        tensor, value = tensors[0], value_infos[0]
        assert tensor.name == value.name
        assert model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TYPES[value.type.tensor_type.elem_type]
        onnx_dims = value.type.tensor_type.shape.dim
        assert len(tensor.dims) == len(onnx_dims) - 1  # Triton's batch dim is implicit
        for triton_dim, onnx_dim in zip(tensor.dims, onnx_dims[1:], strict=True):
            assert triton_dim == (onnx_dim.dim_value if onnx_dim.HasField("dim_value") else -1)


def test_every_config_parses_and_matches_its_onnx(exported_run, tmp_path):
    out = tmp_path / "triton"
    names = write_repository(exported_run / "export", out, io=("labels", "logits"))
    engines = [e for s in ("cnn", "vit") for e in read_manifest(exported_run / "export" / s).engines]
    # TensorRT's graph: on GPU its plan serves it; OpenVINO engines are their ONNX models of onnxruntime_onnx
    shipped = [e for e in engines if e.variant != "int8.qdq" and e.format != "openvino"]
    assert len(names) == len(shipped) and sorted(p.name for p in out.iterdir()) == sorted(names)
    max_batch = read_manifest(exported_run / "export" / "cnn").shapes["max"][0]
    for name in names:
        config = _parse(out / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == max_batch
        assert config.HasField("dynamic_batching")
        expected_kind = "KIND_CPU" if "int8_cpu" in name else "KIND_GPU"
        assert "int8_qdq" not in name
        assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == expected_kind
        _check_against_onnx(config, out / name / "1" / "model.onnx")
    assert {"cnn_fp32", "vit_fp32_logits"} <= set(names)


def test_cli_filters_variants_and_forces_cpu(exported_run, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["--run", str(exported_run), "--out", str(out), "--variants", "fp32", "--cpu", "--instances", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cnn_fp32", "vit_fp32"]
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
    names = write_repository(root, tmp_path / "gpu", tensorrt="10.16.0")
    plans = sorted(n for n in names if n.endswith("_trt"))
    assert len(plans) == 2 and all((tmp_path / "gpu" / n / "1" / "model.plan").is_file() for n in plans)
    assert "built for TensorRT 10.8.0, the server runs 10.16.0" in caplog.text
    cpu = write_repository(root, tmp_path / "cpu", cpu_only=True)
    assert {"cnn_int8_qdq", "vit_int8_qdq"} <= set(cpu) and not any(n.endswith("_trt") for n in cpu)
    config = _parse(tmp_path / "cpu" / "cnn_int8_qdq" / "config.pbtxt")
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
