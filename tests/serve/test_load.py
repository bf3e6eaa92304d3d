from __future__ import annotations

import json
import time

from benchmarks.load import Refused, drive, main, summary


def test_load_check_counts_requests_and_errors(server, tmp_path, capsys):
    # Each client its own image (the default): identical concurrent images race in Gradio's
    # content-hash cache, which rewrites a cached output file while another response streams it.
    out = tmp_path / "load.json"
    args = ["--url", server, "--clients", "4", "--seconds", "3", "--size", "60", "80", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["requests"] >= 4 and r["clients"] == 4
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert "| 4 | " in capsys.readouterr().out and r["connect_s"] >= 0

    # A model the server does not have: every request fails, and the check says so (exit 1).
    assert main([*args[:-2], "--json", str(out), "--backend", "ort.cpu.int4"]) == 1
    r = json.loads(out.read_text())
    assert r["requests"] == 0 and r["errors"] > 0 and r["error_messages"]


def test_the_clock_starts_when_every_client_has_connected():
    """A slow handshake (here 1 s) does not eat a short window: every client still sends for the whole of it."""

    def make_sender(i: int):
        time.sleep(1.0)
        return lambda: time.sleep(0.01)

    run = drive(3, 0.3, make_sender)
    assert run.connect >= 1.0 and 0.3 <= run.elapsed < 0.9 and not run.errors
    assert len(run.latencies) >= 3 * 10  # each client about 0.3 s / 10 ms of requests
    assert all(0 <= t < 0.3 for t, _ in run.answered)  # each answer's time on the window's clock


def test_deliberate_refusals_are_counted_apart_from_errors_and_answers():
    def make_sender(i: int):
        calls = iter(range(10**6))

        def send():
            n = next(calls)
            if n % 3 == 1:
                raise Refused("empty.png: not an image")
            if n % 3 == 2:
                raise RuntimeError("the server went away\ntraceback...")

        return send

    run = drive(2, 0.2, make_sender)
    answered, refused, errors = len(run.answered), sum(run.refused.values()), sum(run.errors.values())
    assert answered >= 2 and abs(refused - answered) <= 2 and abs(errors - answered) <= 2
    assert set(run.refused) == {"empty.png: not an image"} and set(run.errors) == {"the server went away"}
    assert summary(run)["errors"] == errors and summary(run)["requests"] == answered
