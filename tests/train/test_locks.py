"""One process at a time writes a run dir or an engine dir: a second is refused at start, naming the first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_run_args, train_here
from train.run_dir import RunBusy, held


def test_a_held_lock_refuses_a_second_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    lock = tmp_path / "run" / "x.lock"
    with held(lock, "a job"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and "since" in holder and holder["command"]
        busy = rf"{tmp_path / 'run'} is busy: a job by pid {os.getpid()} on .* since"
        with pytest.raises(RunBusy, match=busy), held(lock, "a job"):
            pass
    assert not lock.exists()  # released
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({**holder, "pid": gone.pid}))  # killed before it could release
    with held(lock, "a job"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_second_training_into_a_run_dir_is_refused_while_the_first_runs(synthetic_root, tmp_path):
    run = tmp_path / "run"
    args = ["--config", "configs/synthetic.yaml", "--run-dir", str(run), *tiny_run_args(synthetic_root, 400)]
    first = subprocess.Popen(
        [sys.executable, "-m", "train", *args, "checkpoint_interval=1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint" / "last.safetensors").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.1)
        second = train_here("--resume", str(run))
        assert second.returncode == 2 and f"is busy: training by pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first goes on
    finally:
        first.kill()
        first.wait()
    resumed = train_here("--resume", str(run), "iterations=2")  # its lock is taken over
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (run / "train.lock").exists()


def test_a_second_export_into_an_engine_dir_is_refused_at_start(trained_run, tmp_path, capsys):
    from export.__main__ import main

    out = tmp_path / "export"
    with held(tmp_path / "export.lock", "an export"):
        assert main(["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32"]) == 2
    assert f"{tmp_path} is busy: an export by pid {os.getpid()}" in capsys.readouterr().err
    assert not out.exists()  # nothing written
