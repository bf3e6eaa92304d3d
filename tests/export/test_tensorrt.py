"""The TensorRT builder's logic, testable without TensorRT; the build itself skips without it."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from export import tensorrt as trt_export
from serve.manifest import EngineEntry, read_manifest, sha256, write_manifest

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
TARGET = trt_export.Target("10.16.1", "NVIDIA H100 80GB HBM3", "9.0")


def test_profile_shapes_follow_the_manifest_in_each_layout(exported_run):
    manifest = read_manifest(exported_run / "export" / "cnn")
    assert manifest.shapes == {"min": [1, 32, 32], "opt": [1, 40, 56], "max": [4, 80, 112]}
    assert manifest.profile("labels") == ((1, 32, 32, 3), (1, 40, 56, 3), (4, 80, 112, 3))
    assert manifest.profile("logits") == ((1, 3, 32, 32), (1, 3, 40, 56), (4, 3, 80, 112))


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
    onnx_entry = read_manifest(engine_dir).find("onnxruntime", "fp32", ("fp32",), "labels")
    onnx_sha = sha256(engine_dir / onnx_entry.file)
    (tmp_path / "model.fp32.plan").write_bytes(b"plan")
    built = {"version": TARGET.version, "gpu": TARGET.gpu, "compute_capability": "9.0", "onnx_sha256": onnx_sha}
    built["tf32"] = False
    plan = EngineEntry("model.fp32.plan", "plan", "labels", "fp32", "fp32", "tensorrt", tensorrt=built)

    assert trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, TARGET, tmp_path) is None
    assert trt_export.rebuild_reason(None, onnx_entry, onnx_sha, TARGET, tmp_path) == "no plan yet"
    other_gpu = trt_export.Target(TARGET.version, "NVIDIA L4", "8.9")
    assert "gpu" in trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, other_gpu, tmp_path)
    newer = trt_export.Target("11.1.0", TARGET.gpu, "9.0")
    assert "version" in trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, newer, tmp_path)
    assert "changed" in trt_export.rebuild_reason(plan, onnx_entry, "0" * 64, TARGET, tmp_path)
    with_tf32 = dataclasses.replace(plan, tensorrt={**built, "tf32": True})  # an fp32 plan built before
    assert "tf32" in trt_export.rebuild_reason(with_tf32, onnx_entry, onnx_sha, TARGET, tmp_path)
    (tmp_path / "model.fp32.plan").unlink()
    assert trt_export.rebuild_reason(plan, onnx_entry, onnx_sha, TARGET, tmp_path) == "no plan yet"


def test_trtexec_command_builds_the_same_profile_and_fp32_without_tf32():
    shapes = ((1, 32, 32, 3), (1, 64, 64, 3), (8, 128, 128, 3))
    cmd = trt_export.trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, Path("c.bin"), "image", tf32=False)
    assert cmd[0] == "trtexec" and "--minShapes=image:1x32x32x3" in cmd and "--maxShapes=image:8x128x128x3" in cmd
    assert "--saveEngine=m.plan" in cmd and "--timingCacheFile=c.bin" in cmd and "--noTF32" in cmd
    assert "--noTF32" not in trt_export.trtexec_command(Path("m.onnx"), Path("m.plan"), shapes, Path("c"), "x", True)
    assert [trt_export.uses_tf32(v) for v in ("fp32", "fp16", "int8.qdq")] == [False, True, True]


@pytest.mark.parametrize(
    ("text", "release"),
    [
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --help\n=== Model Options ===", "10.16.0"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # /usr/src/tensorrt/bin/trtexec --help", "10.3.0"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v110100] [b12] # trtexec --help", "11.1.0"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec --help", "8.6.1"),
        ("10.16.0.72", "10.16.0"),  # tensorrt.__version__: the Python API names the same release alike
        ("11.1.0.5", "11.1.0"),
    ],
)
def test_the_tensorrt_release_from_trtexecs_banner_and_the_module(text, release):
    assert trt_export.release(text) == release


def test_an_unreadable_trtexec_banner_is_an_error_not_a_version():
    with pytest.raises(trt_export.TensorRTUnavailable, match="cannot read a TensorRT version"):
        trt_export.release("trtexec: error while loading shared libraries: libnvinfer.so.10")


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
    assert trt_export.plan_agreement(cnn, cnn, images) == {"batch1": 1.0, "batched": 1.0}
    other = trt_export.plan_agreement(cnn, vit, images)
    assert set(other) == {"batch1", "batched"} and all(v < 1.0 for v in other.values())


def test_a_new_export_keeps_the_plans_whose_onnx_is_unchanged(exported_run, tmp_path, caplog):
    from export.pipeline import _keep_plans

    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(exported_run / "export" / "cnn", old)
    shutil.copytree(exported_run / "export" / "cnn", new)
    manifest = read_manifest(old)
    for variant, sha in (("fp32", sha256(old / "model.fp32.onnx")), ("fp16", "0" * 64)):  # fp16 "changed"
        (old / f"model.{variant}.plan").write_bytes(b"plan " + variant.encode())
        built = {"version": TARGET.version, "onnx_sha256": sha}
        manifest.engines.append(
            EngineEntry(f"model.{variant}.plan", "plan", "labels", variant, variant, "tensorrt", tensorrt=built)
        )
    write_manifest(manifest, old)

    _keep_plans(old, new, read_manifest(new))
    kept = [e.file for e in read_manifest(new).engines if e.format == "plan"]
    assert kept == ["model.fp32.plan"] and (new / "model.fp32.plan").read_bytes() == b"plan fp32"
    assert not (new / "model.fp16.plan").exists() and "dropped model.fp16.plan" in caplog.text


FAKE_TRTEXEC = """#!/bin/sh
# trtexec's banner and exit codes; the "build" writes the plan file, or fails like a parser error on fp16
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # trtexec $*"
for arg in "$@"; do
  case $arg in
    --onnx=*fp16*) echo "[E] unsupported node" >&2; exit 1;;
    --saveEngine=*) echo plan > "${arg#--saveEngine=}";;
  esac
done
"""


@pytest.mark.skipif(HAVE_TRT, reason="the tensorrt module would build instead of trtexec")
def test_a_plan_that_fails_leaves_the_others_built_and_recorded(exported_run, tmp_path, monkeypatch, capsys):
    """The build orchestration with stand-ins for trtexec and nvidia-smi (TensorRT is not installable
    here): a failing variant is named, and every other plan of both students is built and recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA L4, 8.9'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "export"
    shutil.copytree(exported_run / "export", out)

    args = ["--run", str(exported_run), "--out", str(out), "--variants", "fp32", "fp16", "--no-check"]
    assert trt_export.main(args) == 1
    err = capsys.readouterr().err
    assert "cnn/model.fp16.plan" in err and "vit/model.fp16.plan" in err
    for student in ("cnn", "vit"):
        plans = {e.file: e for e in read_manifest(out / student).engines if e.format == "plan"}
        assert set(plans) == {"model.fp32.plan", "model.fp32.logits.plan"}
        assert (
            plans["model.fp32.plan"].tensorrt["version"] == "10.16.0" and not plans["model.fp32.plan"].tensorrt["tf32"]
        )
        assert not list((out / student).glob(".*.tmp")) and not (out / student / "model.fp16.plan").exists()


def test_profile_is_sized_by_the_memory_it_needs():
    from export.pipeline import profile_shapes

    # the demo: twice the serving size at batch 16 is a few MiB
    assert profile_shapes((64, 64), 5, 16, None, 2048) == (
        {"min": [1, 32, 32], "opt": [1, 64, 64], "max": [16, 128, 128]},
        None,
    )
    # Cityscapes, 19 classes at 1024x2048: batch 16 at 2x would be 9.5 GiB of logits, at 1x 2.4 GiB;
    # within 2 GiB: the serving size, 13 images
    shapes, note = profile_shapes((1024, 2048), 19, 16, None, 2048)
    assert shapes["max"] == [13, 1024, 2048] and "max batch 13" in note and "--profile-budget-mib" in note
    # at batch 4 the serving size fits, 2x does not: larger images are scaled down into the serving size
    shapes, note = profile_shapes((1024, 2048), 19, 4, None, 2048)
    assert shapes["max"] == [4, 1024, 2048] and "scaled to 1024x2048" in note
    # an explicit max size is kept; only the batch gives way, down to 1
    assert profile_shapes((1024, 2048), 19, 16, (2048, 4096), 2048)[0]["max"] == [3, 2048, 4096]
    assert profile_shapes((1024, 2048), 19, 16, (4096, 8192), 100)[0]["max"] == [1, 4096, 8192]


def _fake_tools(tmp_path, monkeypatch) -> Path:
    """trtexec and nvidia-smi stand-ins on PATH; nvidia-smi records its arguments in bin/nvidia-smi.args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\necho "$@" > {bin_dir}/nvidia-smi.args\necho "NVIDIA L4, 8.9"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


@pytest.mark.skipif(HAVE_TRT, reason="the tensorrt module would build and check instead of trtexec")
def test_a_plan_whose_check_cannot_run_is_kept_unchecked_and_checked_by_a_later_run(
    exported_run, tmp_path, monkeypatch, caplog
):
    """trtexec without the tensorrt module or pycuda (a CUDA box with a TensorRT tarball): the plans are built,
    cannot be run to check them, and are kept, marked unchecked with why and how to check them later."""
    _fake_tools(tmp_path, monkeypatch)
    out = tmp_path / "export"
    shutil.copytree(exported_run / "export", out)
    assert (
        trt_export.main(["--run", str(exported_run), "--out", str(out), "--students", "cnn", "--variants", "fp32"]) == 0
    )
    plans = {e.file: e for e in read_manifest(out / "cnn").engines if e.format == "plan"}
    assert set(plans) == {"model.fp32.plan", "model.fp32.logits.plan"}
    for plan in plans.values():
        assert (out / "cnn" / plan.file).is_file()
        assert plan.parity["checked"] is False and "tensorrt is not installed" in plan.parity["why"]
        assert "python -m export.tensorrt --run RUN on a host with tensorrt and pycuda" in plan.parity["how"]
    assert "kept unchecked" in caplog.text

    # A later run where the plans can run checks them without rebuilding; one that disagrees is deleted.
    checked = []

    def fake_check(engine_dir, manifest, entry, plan_path, plan, examples):
        checked.append(plan.file)
        if plan.file == "model.fp32.logits.plan":
            raise trt_export.PlanParityError(f"{plan.file}: 90% agreeing (plan deleted)")
        return {"checked": True, "agreement": 1.0}

    monkeypatch.setattr(trt_export, "_check_plan", fake_check)
    assert (
        trt_export.main(["--run", str(exported_run), "--out", str(out), "--students", "cnn", "--variants", "fp32"]) == 1
    )
    plans = {e.file: e for e in read_manifest(out / "cnn").engines if e.format == "plan"}
    assert sorted(checked) == ["model.fp32.logits.plan", "model.fp32.plan"]
    assert set(plans) == {"model.fp32.plan"} and plans["model.fp32.plan"].parity["checked"] is True
    assert not (out / "cnn" / "model.fp32.logits.plan").exists()


def test_the_gpu_a_plan_is_stamped_with_is_the_visible_one(tmp_path, monkeypatch):
    bin_dir = _fake_tools(tmp_path, monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert trt_export.detect_target("10.16.0") == trt_export.Target("10.16.0", "NVIDIA L4", "8.9")
    assert "--id=2" in (bin_dir / "nvidia-smi.args").read_text()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    trt_export.detect_target("10.16.0")
    assert "--id=0" in (bin_dir / "nvidia-smi.args").read_text()
