"""A disk that fills up: training checkpoints, the export and serve.predict stop with a sentence naming the path and
the space needed, and what was there before stays usable. Each runs on a small tmpfs of its own (root only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_EXPORT_ARGS, run_module, train_here


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes, unmounted after the test."""
    mounts = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_checkpoint_that_does_not_fit_names_its_path_and_size_and_the_last_one_resumes(trained_run, small_disk):
    checkpoint = trained_run / "checkpoint" / "last.safetensors"
    ignore = shutil.ignore_patterns("export", "bench", "triton")
    needed = size_of(trained_run) - size_of(trained_run / "export") - size_of(trained_run / "bench")
    disk = small_disk(needed + checkpoint.stat().st_size // 2)  # room for the run, not for a second checkpoint
    run = disk / "run"
    shutil.copytree(trained_run, run, ignore=ignore)
    result = train_here("--resume", str(run), "iterations=12", "eval_interval=100")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"no space left to write {run}" in result.stderr and "MiB are free there" in result.stderr
    assert "is intact" in result.stderr and not list(run.rglob(".*.tmp"))
    from train.checkpoint import load_state

    assert load_state(run / "checkpoint" / "last.safetensors")["iteration"] == 8  # the last one that fitted


def test_predict_on_a_full_disk_keeps_what_it_finished_and_says_what_is_missing(exported_run, small_disk):
    from serve.predict import recorded

    out = small_disk(6 * 4096)  # six pages: fewer than the outputs of four images (class map, overlay, confidence)
    examples = exported_run / "export" / "examples"
    args = ["serve.predict", "--engines", str(exported_run / "export"), "--out", str(out), "--overlay"]
    result = run_module(*args, "--confidence", "--confidence-format", "npy", str(examples))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        f"no space left on the disk of {out}" in result.stderr and "finished outputs and their records" in result.stderr
    )
    assert not list(out.rglob(".*.tmp*"))  # no half file
    for output in recorded(out / "predictions.jsonl"):  # everything recorded is whole
        assert (out / output).is_file()


def test_an_export_on_a_full_disk_names_the_space_it_needs_and_leaves_the_live_engines(exported_run, small_disk):
    from serve.manifest import read_manifest
    from serve.segmenter import load_segmenter

    previous = exported_run / "export" / "cnn"
    disk = small_disk(size_of(previous.resolve()) + size_of(previous.resolve()) // 3)
    out = disk / "export"
    shutil.copytree(previous, out / "cnn")
    args = ["export", "--run", str(exported_run), "--out", str(out), "--students", "cnn", "--variants", "fp32"]
    result = run_module(*args, "--no-openvino", "--no-size-sweep", *TEST_EXPORT_ARGS)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"no space left on the disk of {out}: this export needs about" in result.stderr
    manifest = read_manifest(out / "cnn")
    assert all((out / "cnn" / e.file).is_file() for e in manifest.engines)
    image = np.zeros((40, 56, 3), np.uint8)
    assert load_segmenter(out, "cnn", "ort.cpu.fp32").predict(image).labels.shape == (40, 56)
    assert not list(out.glob(".cnn-*"))  # the partial build removed
