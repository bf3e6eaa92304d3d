"""One process at a time writes a run dir or an engine dir: a second is refused at start, naming the first
(with real processes, and the take-over after the first's SIGKILL: tests/benchmarks/test_soak.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def test_a_second_export_into_an_engine_dir_is_refused_at_start(trained_run, tmp_path, capsys):
    from export.__main__ import main

    out = tmp_path / "export"
    with held(tmp_path / "export.lock", "an export"):
        assert main(["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32"]) == 2
    assert f"{tmp_path} is busy: an export by pid {os.getpid()}" in capsys.readouterr().err
    assert not out.exists()  # nothing written
