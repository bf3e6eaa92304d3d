"""An engine in slide mode scores what its PyTorch student scores with eval.mode=slide and the same windows."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.evaluate import evaluate, main


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
