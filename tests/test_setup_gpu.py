"""`make setup-gpu` swaps the ONNX Runtime wheels only once pycuda has built, and puts the CPU wheel
back when onnxruntime-gpu cannot be installed: a host is never left without an ONNX Runtime."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO

FAKE_PYTHON = """#!/bin/sh
# stands in for the venv's python: records each pip call, fails the one named in $FAIL
echo "$*" >> "$LOG"
case "$*" in *"$FAIL"*) exit 1;; esac
"""


def _setup_gpu(tmp_path, fail: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": "/usr/bin:/bin", "LOG": str(log), "FAIL": fail}
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "setup-gpu", f"PY={python}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    return done, log.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_pycuda_build_failure_leaves_the_cpu_onnxruntime_installed(tmp_path):
    done, calls = _setup_gpu(tmp_path, fail="pycuda")
    assert done.returncode != 0 and "CUDA toolkit" in done.stderr and "CUDA_ROOT" in done.stderr
    assert len(calls) == 1 and "pycuda" in calls[0]  # nothing uninstalled


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_failed_onnxruntime_gpu_install_puts_the_cpu_wheel_back(tmp_path):
    done, calls = _setup_gpu(tmp_path, fail="gpu,dev")
    assert done.returncode != 0 and "the CPU onnxruntime is back" in done.stderr
    assert ["pycuda" in calls[0], "uninstall" in calls[1], "gpu" in calls[2], "[cpu]" in calls[3]] == [True] * 4


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_setup_gpu_installs_pycuda_then_swaps_the_wheels(tmp_path):
    done, calls = _setup_gpu(tmp_path, fail="nothing")
    assert done.returncode == 0, done.stderr
    assert len(calls) == 3 and calls[1].endswith("uninstall --quiet -y onnxruntime") and "gpu" in calls[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_export_trt_passes_args_to_the_plan_builder(tmp_path):
    """Every option of python -m export.tensorrt (--no-check, --variants, ...) is one ARGS away."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    run = tmp_path / "run"
    for student in ("cnn", "vit"):  # exported already: only the plan builder runs
        (run / "export" / student).mkdir(parents=True)
        (run / "export" / student / "manifest.json").write_text("{}")
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "export-trt", f"PY={python}", f"RUN={run}",
         "ARGS=--variants fp16 --no-check"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", "LOG": str(log), "FAIL": "nothing"}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [f"-m export.tensorrt --run {run} --variants fp16 --no-check"]
