"""An engine in slide mode scores what its PyTorch student scores with eval.mode=slide and the same windows."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.evaluate import evaluate, main
from serve.backends import BACKENDS, problem


@pytest.mark.parametrize("slide", [True, False])
def test_engines_agree_with_their_students_in_the_same_mode(exported_run, slide):
    args = argparse.Namespace(split="val", models=["cnn", "ensemble"], backend="ort.cpu.fp32", slide=slide,
                              window=None, stride=None, mosaic=[2, 2], images=2)  # fmt: skip
    results = evaluate(exported_run, args)
    for model, r in results.items():
        assert abs(r["engine"] - r["torch"]) <= 0.005, (model, r)  # within the fp32 parity gate's ΔmIoU


def test_the_cli_prints_a_table(exported_run, capsys):
    args = ["--run", str(exported_run), "--split", "val", "--models", "vit", "--slide", "--mosaic", "2", "2"]
    assert main([*args, "--images", "1"]) == 0
    out = capsys.readouterr().out
    assert "| vit |" in out and "slide" in out


def test_slide_batching_times_batched_windows_against_one_at_a_time(exported_run, capsys):
    from benchmarks.slide_batching import main as slide_batching

    args = ["--engines", str(exported_run / "export"), "--split", "val", "--models", "vit", "--mosaic", "2", "2"]
    cannot = next((b.name for b in BACKENDS.values() if b.runtime == "onnxruntime" and problem(b)), None)
    backends = ["ort.cpu.fp32", *([cannot] if cannot else [])]
    assert slide_batching([*args, "--backends", *backends, "--rounds", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("| ort.cpu.fp32 | vit |"))
    windows, single, batched, speedup, rate, share = (cell.strip() for cell in row.split("|")[3:9])
    assert int(windows) > 1 and float(single) > 0 and float(batched) > 0 and speedup.endswith("]")
    assert float(rate) > 0 and share.endswith("%")
    if cannot:  # a backend this host cannot run gets a row that says why, and the benchmark goes on
        refused = [line for line in lines if line.startswith(f"| {cannot} | vit | not run: ")]
        assert refused and problem(BACKENDS[cannot]) in refused[0]
