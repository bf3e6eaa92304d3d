from __future__ import annotations

import json

from benchmarks.load import main


def test_load_check_counts_requests_and_errors(server, tmp_path, capsys):
    # Each client its own image (the default): identical concurrent images race in Gradio's
    # content-hash cache, which rewrites a cached output file while another response streams it.
    out = tmp_path / "load.json"
    args = ["--url", server, "--clients", "4", "--seconds", "3", "--size", "60", "80", "--json", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["requests"] >= 4 and r["clients"] == 4
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert "| 4 | " in capsys.readouterr().out

    # A model the server does not have: every request fails, and the check says so (exit 1).
    assert main([*args[:-2], "--json", str(out), "--backend", "ort.cpu.int4"]) == 1
    r = json.loads(out.read_text())
    assert r["requests"] == 0 and r["errors"] > 0 and r["error_messages"]
