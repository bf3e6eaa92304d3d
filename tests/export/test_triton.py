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
    shipped = {(s, e.variant, e.io) for s in ("cnn", "vit") for e in read_manifest(exported_run / "export" / s).engines}
    assert len(names) == len(shipped) and sorted(p.name for p in out.iterdir()) == sorted(names)
    max_batch = read_manifest(exported_run / "export" / "cnn").shapes["max"][0]
    for name in names:
        config = _parse(out / name / "config.pbtxt")
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == max_batch
        assert config.HasField("dynamic_batching")
        expected_kind = "KIND_CPU" if "int8_cpu" in name else "KIND_GPU"
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
