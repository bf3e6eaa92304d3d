"""The soak and fault benchmark's scenarios, each in a short version on the shared export: real servers, real
clients, real SIGKILLs (python -m benchmarks.soak runs them for an hour)."""

from __future__ import annotations

import pytest

from benchmarks.soak import (
    AWKWARD,
    TRITON_PYTHON,
    Row,
    main,
    markdown,
    soak_app,
    soak_export,
    soak_locks,
    soak_predict,
    soak_triton,
)
from tests.conftest import TEST_EXPORT_ARGS, train_here
from train.checkpoint import load_state

EXPORT_ARGS = ["--students", "cnn", "--variants", "fp32", "--no-openvino", "--no-size-sweep", *TEST_EXPORT_ARGS]


def test_the_app_under_load_answers_every_good_request_and_refuses_each_awkward_file(exported_run, tmp_path):
    row = soak_app(exported_run / "export", 8, tmp_path, clients=3, sizes=[32, 64], awkward_every=3)
    assert not row.errors and not row.lost, row
    assert row.requests >= 3 and set(row.refused) <= set(AWKWARD) and len(row.refused) >= 1  # each got its refusal
    assert len(row.windows) == 6 and sum(n for *_, n in row.windows) == row.requests
    assert row.rss_mib[0] > 50 and row.fds[0] > 3  # the server's process was watched
    assert row.notes[-1] == "the server stopped with exit code 0"  # SIGTERM closes it cleanly


def test_triton_keeps_serving_every_model_while_one_is_corrupted_and_reloaded(exported_run, tmp_path):
    if not TRITON_PYTHON.exists():
        pytest.skip(f"{TRITON_PYTHON} is missing: make serve-triton (or make test) creates it")
    row = soak_triton(exported_run / "export", 20, tmp_path, clients=4, models=("cnn",), exit_timeout=3)
    assert not row.errors, row  # every other model kept serving through the corruption
    reload = next(n for n in row.notes if "reloaded" in n)
    assert "the reload failed" in reload and "vit_fp32" in reload and "INVALID_PROTOBUF" in reload, reload
    assert row.windows[-1][2] > 0 and row.notes[-1].startswith("the server stopped with exit code 0 in ")


def test_predict_killed_three_times_ends_as_an_uninterrupted_run_computing_nothing_twice(exported_run, tmp_path):
    row = soak_predict(exported_run / "export", images=40, kills=3, scratch=tmp_path)
    assert row.lost == 0 and not row.errors, row
    starts = row.notes[-1].split(" | ")
    assert len(starts) == 4 and sum("exit -9" in s for s in starts) >= 2 and "inputs already done" in starts[-1]


def test_an_export_killed_at_random_moments_always_leaves_a_whole_serving_engine_set(exported_run, tmp_path):
    row = soak_export(exported_run, kills=1, scratch=tmp_path, export_args=EXPORT_ARGS)
    assert row.lost == 0 and not row.errors, row
    starts = row.notes[-1].removeprefix("starts: ").split(", ")  # a kill lands within 2-90 % of an export's time
    assert [s.startswith("exit -9") for s in starts].count(True) == 1 and starts[-1] == "exit 0", row.notes


def test_a_second_export_and_a_second_training_are_refused_while_the_first_runs(trained_run, tmp_path):
    row = soak_locks(trained_run, tmp_path, EXPORT_ARGS)
    assert row.refused == {"a second export": 1, "a second training": 1} and not row.errors, row
    run = tmp_path / "locked-run"  # the first training was SIGKILLed holding its lock: the next one takes it over
    reached = load_state(run / "checkpoint" / "last.safetensors")["iteration"]
    resumed = train_here("--resume", str(run), f"iterations={reached + 1}")
    assert resumed.returncode == 0 and not (run / "train.lock").exists(), resumed.stderr[-2000:]


def test_the_report_names_each_missed_target():
    rows = [
        Row("app", 60, 100, windows=[(10, 20, 9), (10, 20, 9), (10, 30, 9)], rss_mib=(100, 111), fds=(10, 16)),
        Row("predict", 5, 20, errors={"2 outputs computed twice": 1}, lost=1),
        Row("locks", 1, 2, refused={"a second export": 1}),
    ]
    text = markdown(rows, "python -m benchmarks.soak --run runs/demo")
    app, predict, locks = (line for line in text.splitlines() if line.startswith(("| app", "| predict", "| locks")))
    assert "RSS grew 1.11x" in app and "open files 10 -> 16" in app and "p99 20 -> 30 ms" in app
    assert predict.endswith("| 1 | 1 errors, 1 lost |") and locks.endswith("| 0 | none |")
    assert "- error ×1: 2 outputs computed twice" in text


def test_a_run_without_engines_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path)])
    assert f"{tmp_path}: no engines under" in capsys.readouterr().err
