from __future__ import annotations

import functools
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from benchmarks.bench import TorchRunner, main
from serve.manifest import read_manifest
from serve.slide import Sliding
from train.models import StudentOutput

TIMING_KEYS = {"mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "cv", "runs", "images_per_s", "speedup"}
ACCURACY_KEYS = {"miou", "miou_torch", "delta_miou", "agreement"}
ROW_KEYS = {
    "model",
    "backend",
    "precision",
    "mode",
    "device",
    "batch",
    "height",
    "width",
    "status",
    "file_mib",
    "rss_mib",
}


@pytest.fixture(scope="module")
def bench(exported_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--run", str(exported_run), "--models", "cnn", "--backends", "ort.cpu.fp32", "ov.fp32", "trt.fp32",
            "--batch-sizes", "1", "2", "--sizes", "40x56", "--seconds", "0.1", "--min-runs", "3",
            "--warmup", "0.05", "--eval-images", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0  # a failing backend does not fail the bench
    return out, json.loads((out / "results.json").read_text())


def test_results_json_is_complete(bench):
    _, result = bench
    assert result["schema"] == 1
    assert {"cpu", "gpu", "device", "cpu_count"} <= set(result["machine"])
    assert {"torch", "onnxruntime", "tensorrt", "openvino"} <= set(result["versions"])
    rows = result["results"]
    # The PyTorch eager baseline is always measured first, then the requested backends.
    assert [(r["backend"], r["batch"]) for r in rows] == [
        ("torch", 1), ("torch", 2), ("ort.cpu.fp32", 1), ("ort.cpu.fp32", 2), ("ov.fp32", 1), ("ov.fp32", 2),
        ("trt.fp32", 1), ("trt.fp32", 2),
    ]  # fmt: skip
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6
    for r in ok:
        assert set(r) >= ROW_KEYS | TIMING_KEYS | ACCURACY_KEYS, r.keys()
        assert r["runs"] >= 3 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["images_per_s"] == pytest.approx(1e3 * r["batch"] / r["mean_ms"])
        assert 0 <= r["agreement"] <= 1 and r["delta_miou"] == pytest.approx(r["miou"] - r["miou_torch"])
        baseline = next(b for b in ok if b["backend"] == "torch" and b["batch"] == r["batch"])
        assert r["speedup"] == pytest.approx(baseline["mean_ms"] / r["mean_ms"])
    torch_rows = [r for r in ok if r["backend"] == "torch"]
    assert all(r["agreement"] == 1.0 and r["speedup"] == 1.0 for r in torch_rows)


def test_rounds_time_every_backend_in_turn_at_each_point(exported_run, tmp_path, monkeypatch):
    """--rounds: a VM's speed drifts over minutes, so each point's engines are timed in interleaved blocks."""
    import benchmarks.bench as bench_module

    blocks, time_it = [], bench_module.time_it

    def recorded(run, *args, **kwargs):
        blocks.append((run.func.backend, run.args[0].shape[0]))  # (backend, batch) of the timed block
        return time_it(run, *args, **kwargs)

    monkeypatch.setattr(bench_module, "time_it", recorded)
    run = shutil.copytree(exported_run, tmp_path / "run")  # the bench rewrites the model cards' latency
    args = ["--run", str(run), "--models", "cnn", "--backends", "ort.cpu.fp32", "ov.fp32",
            "--batch-sizes", "1", "2", "--sizes", "40x56", "--seconds", "0.06", "--min-runs", "3", "--warmup", "0",
            "--eval-images", "1", "--rounds", "3", "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(args) == 0
    turn = ["torch", "ort.cpu.fp32", "ov.fp32"]
    assert blocks == [(b, batch) for batch in (1, 2) for _ in range(3) for b in turn]
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    assert [(r["backend"], r["batch"]) for r in rows] == [(b, batch) for b in turn for batch in (1, 2)]
    assert all(r["status"] == "ok" and r["rounds"] == 3 and r["runs"] >= 3 for r in rows)
    assert "--rounds 3" in (tmp_path / "bench" / "report.md").read_text()


def test_every_row_is_appended_to_rows_jsonl_as_it_is_measured(bench):
    """What a run cut off by a deadline still returns: the rows measured so far, one JSON line each."""
    out, result = bench
    lines = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "speedup"}  # noqa: E731  (computed once all are in)
    assert sorted(map(json.dumps, map(strip, lines))) == sorted(map(json.dumps, map(strip, result["results"])))


def test_a_backend_that_raises_is_recorded_and_the_others_complete(bench):
    _, result = bench
    failed = [r for r in result["results"] if r["status"] == "failed"]
    assert {r["backend"] for r in failed} == {"trt.fp32"}
    assert all("plan" in r["error"] for r in failed)  # no plan in this export: the reason is given


def test_an_engine_the_export_left_out_is_a_not_shipped_row_with_its_reason(exported_run, tmp_path):
    """The test run's CPU int8 engines are either shipped (then timed) or left out by the export's int8
    rule or parity gate (then the row says so, with the export's reason, instead of failing)."""
    out, run = tmp_path / "bench", tmp_path / "run"  # a copy: the bench rewrites the model cards
    link_all_but_cards = lambda a, b: (shutil.copy2 if a.endswith(".md") else os.link)(a, b)  # noqa: E731
    shutil.copytree(exported_run, run, copy_function=link_all_but_cards)
    args = ["--run", str(run), "--models", "cnn", "vit", "--backends", "ort.cpu.int8", "ov.int8",
            "--batch-sizes", "1", "--sizes", "40x56", "--seconds", "0.1", "--min-runs", "3",
            "--warmup", "0.05", "--eval-images", "2", "--out", str(out)]  # fmt: skip
    main(args)
    result = json.loads((out / "results.json").read_text())
    for row in (r for r in result["results"] if r["backend"] != "torch"):
        manifest = read_manifest(run / "export" / row["model"])
        runtime = "openvino" if row["backend"] == "ov.int8" else "onnxruntime"
        shipped = {e.variant for e in manifest.engines if e.runtime == runtime}
        if row["status"] == "ok":  # ONNX Runtime falls back to the int8.qdq graph only where int8.cpu is not its own
            assert row["variant"] == ("int8.cpu" if runtime == "openvino" or "int8.cpu" in shipped else "int8.qdq")
            assert row["variant"] in shipped
        else:
            assert row["status"] == "not shipped", row
            assert "fastest float engine" in row["error"] or "parity gate" in row["error"]
    report = (out / "report.md").read_text()
    assert ("## Not shipped by the export" in report) == any(r["status"] == "not shipped" for r in result["results"])


def test_plots_are_pngs(bench):
    out, _ = bench
    for name in ("pareto.png", "latency_vs_batch.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_report_numbers_are_the_json_numbers(bench):
    out, result = bench
    report = (out / "report.md").read_text()
    main_table = report.split("\n\n## ", 1)[0]  # the fastest-engine table and the lists come after
    table = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    header = next(line for line in report.splitlines() if line.startswith("| model"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert len(table) == len(result["results"])
    for line, row in zip(table, result["results"], strict=True):
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert (cells["model"], cells["backend"], cells["status"]) == (row["model"], row["backend"], row["status"])
        if row["status"] != "ok":
            assert cells["mean ms"] == "–"
            continue
        assert float(cells["mean ms"]) == pytest.approx(row["mean_ms"], abs=0.006)
        assert float(cells["p99"]) == pytest.approx(row["p99_ms"], abs=0.006)
        assert float(cells["img/s"]) == pytest.approx(row["images_per_s"], abs=0.06)
        assert float(cells["mIoU"]) == pytest.approx(row["miou"], abs=6e-5)
        assert float(re.sub("x$", "", cells["speed-up"])) == pytest.approx(row["speedup"], abs=0.006)
    assert "trt.fp32" in report.split("## Failed", 1)[1]


def test_the_report_names_the_fastest_engine_of_each_model_at_each_point(bench):
    out, result = bench
    section = (out / "report.md").read_text().split("## Fastest engine\n", 1)[1].split("\n\n## ", 1)[0]
    listed = {tuple(c.strip() for c in line.strip("|").split("|")[:5]) for line in section.splitlines()[3:]}
    ok = [r for r in result["results"] if r["status"] == "ok" and r["backend"] != "torch"]
    expected = set()
    for batch in {r["batch"] for r in ok}:
        best = min((r for r in ok if r["batch"] == batch), key=lambda r: r["mean_ms"])
        expected.add(("cnn", best["mode"], str(batch), "40x56", best["backend"]))
    assert listed == expected and len(expected) == 2


def test_pytorch_rows_need_no_export_and_engine_rows_name_the_missing_step(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "cnn.safetensors", "vit.safetensors"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    small = ["--models", "cnn", "--batch-sizes", "1", "--sizes", "40x56", "--seconds", "0.05", "--min-runs", "2",
             "--warmup", "0", "--eval-images", "1", "--out", str(tmp_path / "bench")]  # fmt: skip
    assert main(["--run", str(run), "--backends", "torch", *small]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "ok")]
    assert main(["--run", str(run), "--backends", "ort.cpu.fp32", *small]) == 2
    assert f"python -m export --run {run}" in capsys.readouterr().err


def test_the_bench_leaves_the_model_cards_to_the_export_and_they_point_to_its_report(bench, exported_run):
    """Each file has one writer: the export writes the cards, the bench its report (which the cards name)."""
    from export.card import engine_card

    out, result = bench
    card = (exported_run / "export" / "cnn" / "README.md").read_text()
    assert card == engine_card(exported_run / "export" / "cnn", read_manifest(exported_run / "export" / "cnn"),
                               yaml.safe_load((exported_run / "config.yaml").read_text()))  # fmt: skip
    assert "python -m benchmarks.bench --run" in card and "bench/report.md" in card
    row = next(r for r in result["results"] if r["backend"] == "ort.cpu.fp32" and r["batch"] == 2)
    assert f"{row['p50_ms']:.2f}" in (out / "report.md").read_text()


def test_openvino_rows_run_with_their_precision(bench):
    _, result = bench
    rows = [r for r in result["results"] if r["backend"] == "ov.fp32"]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["agreement"] >= 0.999 for r in rows)
    assert result["versions"]["openvino"]


def test_cpu_rows_show_achieved_and_peak_gflops_consistent_with_the_json(bench):
    out, result = bench
    peaks = result["gemm_peak_gflops"]
    assert set(peaks) == {"fp32", "bf16", "int8"} and all(v > 0 for v in peaks.values())
    report = (out / "report.md").read_text()
    assert "peak GFLOP/s" in report and "of peak" in report
    for r in (r for r in result["results"] if r["status"] == "ok"):
        assert r["gflop"] > 0 and r["gflops_per_s"] == pytest.approx(r["gflop"] * r["batch"] / (r["mean_ms"] / 1e3))
        assert r["peak_gflops"] == peaks["fp32"] and r["of_peak"] == pytest.approx(r["gflops_per_s"] / peaks["fp32"])
        cells = f"| {r['gflop']:.2f} | {r['gflops_per_s']:.0f} | {r['peak_gflops']:.0f} | {r['of_peak']:.0%} |"
        assert cells in report


class TinyStudent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        return StudentOutput([], x, self.conv(x))


def test_every_compiled_row_is_compiled_not_eager_after_dynamos_recompile_limit(monkeypatch):
    """One compiled row more than dynamo's recompile limit (8) for the one forward they share: each row
    compiles its own graph (on an H100 the rows past the limit ran eager under a compiled label), and a
    row that would fall back to eager fails instead. The limit is dynamo's whatever compiles the graph it
    captures: the rows hand it to aot_eager, not to the CPU's inductor (C++ and gcc, ~3 s a row cold)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    image = np.zeros((1, 8, 8, 3), np.uint8)
    for _ in range(torch._dynamo.config.recompile_limit + 1):
        runner = TorchRunner([TinyStudent()], "torch.compile", torch.device("cpu"))
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runner(image)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before
    assert torch._dynamo.config.fail_on_recompile_limit_hit


def test_slide_rows_beside_fitted_ones_agree_with_pytorch_sliding_the_same_windows(exported_run, tmp_path):
    out = tmp_path / "bench"
    args = ["--run", str(exported_run), "--models", "ensemble", "--backends", "ort.cpu.fp32", "--batch-sizes", "1",
            "--sizes", "96x160", "--seconds", "0.1", "--min-runs", "2", "--warmup", "0.05", "--eval-images", "2",
            "--slide", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert sorted((r["backend"], r["mode"]) for r in rows) == [
        ("ort.cpu.fp32", "fitted"), ("ort.cpu.fp32", "slide"), ("torch", "fitted"), ("torch", "slide"),
    ]  # fmt: skip
    slid = next(r for r in rows if r["backend"] == "ort.cpu.fp32" and r["mode"] == "slide")
    assert slid["status"] == "ok" and slid["agreement"] >= 0.999 and abs(slid["delta_miou"]) <= 0.001
    fitted = next(r for r in rows if r["backend"] == "ort.cpu.fp32" and r["mode"] == "fitted")
    assert slid["gflop"] > 1.5 * fitted["gflop"]  # 8 overlapping 64x64 windows: 2.1x the pixels of 96x160


def test_pytorch_slides_windows_in_batches_with_the_logits_of_one_at_a_time():
    """The slide rows' PyTorch reference runs the engines' max batch of windows a call, as serve.slide does."""
    torch.manual_seed(0)
    student = TinyStudent()
    student.conv = torch.nn.Conv2d(3, 4, 3, padding=1)  # context: a window's border differs from the image's
    x, window = torch.rand(2, 3, 20, 30), Sliding((8, 8), (5, 5))
    one, batched = (TorchRunner([student], "torch", torch.device("cpu"), window, n) for n in (1, 7))
    torch.testing.assert_close(batched._slid(batched.models[0], x), one._slid(one.models[0], x))
