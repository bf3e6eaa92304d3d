"""The precision report: every engine at every size of the gate's sweep, and the int8 graphs' worst tensors."""

from __future__ import annotations

import json
import shutil

import yaml

from benchmarks.precision import main


def test_the_report_measures_each_engine_at_every_size_and_finds_int8_islands(trained_run, tmp_path):
    out = tmp_path / "precision.md"
    args = ["--run", str(trained_run), "--students", "cnn", "--variants", "int8.cpu", "--images", "3"]
    assert main([*args, "--layers", "2", "--no-openvino", "--out", str(out)]) == 0
    (report,) = json.loads(out.with_suffix(".json").read_text())
    engines = report["engines"]
    assert set(engines) == {"onnxruntime fp32 (fp32)", "onnxruntime int8 (int8.cpu)"}
    sizes = {key.split("@")[0] for key in engines["onnxruntime int8 (int8.cpu)"]}
    assert {"32x32", "40x56", "80x112"} <= sizes  # the profile's min, serving size and max
    for point in engines["onnxruntime fp32 (fp32)"].values():
        # no pixel whose margin is above the fp32 engine's own largest error can change class in it
        assert point["confident_agreement"] == 1.0 and point["tolerance"] < 1e-3
        assert abs(point["miou_engine"] - point["miou_student"]) < 1e-9
    int8 = engines["onnxruntime int8 (int8.cpu)"].values()
    assert all(p["max_abs_logit_error"] > 1e-3 and 0 <= p["miou_engine"] <= 1 for p in int8)
    islands = report["islands"]["int8.cpu"]
    worst = islands["worst_tensors"]
    assert len(worst) == 2 and worst[0]["qdq_sqnr_db"] <= worst[1]["qdq_sqnr_db"] and worst[0]["read_by"]
    assert set(islands["agreement_with_fp32_islands"]) == {"Conv kept fp32", "worst 1 kept fp32", "worst 2 kept fp32"}
    assert islands["agreement_with_fp32_islands"]["Conv kept fp32"]["onnxruntime int8 (int8.cpu)"] >= 0.999  # all fp32
    text = out.read_text()
    assert all(0.5 < v <= 1 for v in report["self_agreement"].values())
    assert "| onnxruntime int8 (int8.cpu) |" in text and "32x32@1" in text and "| the student, ±1 grey level |" in text


def test_a_run_whose_dataset_is_not_there_gets_one_line_naming_it(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoint", "export"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["root"] = str(tmp_path / "moved")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["--run", str(run), "--students", "cnn", "--variants", "fp32", "--no-openvino"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: dataset root not found: {tmp_path / 'moved'}"
