from __future__ import annotations

import json
import time

from benchmarks.load import drive, main


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

    latencies, errors, elapsed, connect = drive(3, 0.3, make_sender)
    assert connect >= 1.0 and 0.3 <= elapsed < 0.9 and not errors
    assert len(latencies) >= 3 * 10  # each client about 0.3 s / 10 ms of requests
