"""The TensorRT builder's logic, testable without TensorRT; the build itself skips without it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from export import tensorrt as trt_export
from serve.manifest import EngineEntry, read_manifest, sha256

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
TARGET = trt_export.Target("10.16.1", "NVIDIA H100 80GB HBM3", "9.0")


def test_profile_shapes_follow_the_manifest_in_each_layout(exported_run):
    manifest = read_manifest(exported_run / "export" / "cnn")
    assert manifest.shapes == {"min": [1, 32, 32], "opt": [1, 40, 56], "max": [4, 80, 112]}
    assert trt_export.profile_shapes(manifest, "labels") == ((1, 32, 32, 3), (1, 40, 56, 3), (4, 80, 112, 3))
    assert trt_export.profile_shapes(manifest, "logits") == ((1, 3, 32, 32), (1, 3, 40, 56), (4, 3, 80, 112))


def test_network_flags_strongly_typed_on_10_and_zero_on_11():
    fake = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1))
    assert trt_export.network_flags(fake, 10) == 1 << 1
    assert trt_export.network_flags(fake, 11) == 0


def test_plan_and_cache_names():
    assert trt_export.plan_file("model.fp16.logits.onnx") == "model.fp16.logits.plan"
    a = trt_export.cache_file(Path("/x"), TARGET)
    b = trt_export.cache_file(Path("/x"), trt_export.Target("11.1.0", TARGET.gpu, "9.0"))
    c = trt_export.cache_file(Path("/x"), trt_export.Target("10.16.1", "NVIDIA L4", "8.9"))
    assert len({a, b, c}) == 3 and a.name == "timing-cache.trt10.16.1.nvidia-h100-80gb-hbm3.sm90.bin"


def test_rebuild_decisions(exported_run, tmp_path):
    engine_dir = exported_run / "export" / "cnn"
    onnx_entry = read_manifest(engine_dir).find("fp32", "labels")
    onnx_sha = sha256(engine_dir / onnx_entry.file)
    (tmp_path / "model.fp32.plan").write_bytes(b"plan")
    built = {"version": TARGET.version, "gpu": TARGET.gpu, "compute_capability": "9.0", "onnx_sha256": onnx_sha}
    plan = EngineEntry("model.fp32.plan", "plan", "labels", "fp32", "fp32", "tensorrt", tensorrt=built)

    assert trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, TARGET, tmp_path) is None
    assert trt_export.rebuild_reason(None, onnx_entry, onnx_sha, TARGET, tmp_path) == "no plan yet"
    other_gpu = trt_export.Target(TARGET.version, "NVIDIA L4", "8.9")
    assert "gpu" in trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, other_gpu, tmp_path)
    newer = trt_export.Target("11.1.0", TARGET.gpu, "9.0")
    assert "version" in trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, newer, tmp_path)
    assert "changed" in trt_export.rebuild_reason(plan, onnx_entry, "0" * 64, TARGET, tmp_path)
    (tmp_path / "model.fp32.plan").unlink()
    assert trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, TARGET, tmp_path) == "no plan yet"


def test_trtexec_command_builds_the_same_profile():
    shapes = ((1, 32, 32, 3), (1, 64, 64, 3), (8, 128, 128, 3))
    cmd = trt_export.trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, Path("c.bin"), "image")
    assert cmd[0] == "trtexec" and "--minShapes=image:1x32x32x3" in cmd and "--maxShapes=image:8x128x128x3" in cmd
    assert "--saveEngine=m.plan" in cmd and "--timingCacheFile=c.bin" in cmd


@pytest.mark.skipif(HAVE_TRT or shutil.which("trtexec"), reason="TensorRT is installed here")
def test_without_tensorrt_the_cli_says_how_to_install_it(exported_run, capsys):
    assert trt_export.main(["--run", str(exported_run)]) == 3
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pypi.nvidia.com" in err
    assert (exported_run / "export" / "cnn" / "model.fp32.onnx").is_file()  # the ONNX engines stay


@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt module and an NVIDIA GPU (not installable here)")
def test_builds_plans_and_keeps_valid_ones(exported_run):
    engine_dir = exported_run / "export" / "cnn"
    manifest = trt_export.build_engine_dir(engine_dir, ["fp32"], engine_dir.parent)
    plans = [e for e in manifest.engines if e.format == "plan"]
    assert {e.io for e in plans} == {"labels", "logits"} and all((engine_dir / e.file).stat().st_size for e in plans)
    again = trt_export.build_engine_dir(engine_dir, ["fp32"], engine_dir.parent)
    assert [e.build_s for e in again.engines if e.format == "plan"] == [e.build_s for e in plans]


def test_plan_agreement_is_the_share_of_equal_pixels_at_batch_1_and_batched(exported_run):
    from serve.images import read_image
    from serve.runtime import open_engine

    root = exported_run / "export"
    images = [read_image(p) for p in sorted((root / "examples").glob("*.png"))]
    assert images, "the export writes example images for the plan gate and the demo"
    cnn, vit = open_engine(root / "cnn", device="cpu"), open_engine(root / "vit", device="cpu")
    assert trt_export.plan_agreement(cnn, cnn, images) == 1.0
    assert trt_export.plan_agreement(cnn, vit, images) < trt_export.plan_agreement(cnn, cnn, images)
