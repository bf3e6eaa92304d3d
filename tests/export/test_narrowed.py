"""An engine the gate passes at the serving size but refuses elsewhere ships for the widest box of sizes around
the serving size that passes the gate again, else for that size alone: its manifest, model card, TensorRT profile
and Triton config say so, and serve and the bench send other sizes to the next engine."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.pipeline
from benchmarks.bench import main as bench
from export.__main__ import main as export_main
from export.parity import boxes, inside
from export.triton import RepositoryOptions, write_repository
from serve.manifest import read_manifest
from serve.segmenter import load_segmenter
from tests.conftest import TEST_EXPORT_ARGS

WIDE = (32, 112)  # wider than twice its height: the sizes this engine gets wrong
SERVING = (40, 56)


def wrong_when_wide(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` plus a large score on class 1 wherever the input is more than twice as wide as high."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    g, out = broken.graph, broken.graph.output[0].name
    producer = next(n for n in g.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "raw_logits"
    classes = g.output[0].type.tensor_type.shape.dim[1].dim_value  # static: the class count
    bias = np.zeros((1, classes, 1, 1), np.float32)
    bias[0, 1] = 50.0
    g.initializer.extend([
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array(3, np.int64), "three"),
        numpy_helper.from_array(bias, "class1_bias"),
    ])  # fmt: skip
    g.node.extend([
        helper.make_node("Shape", ["raw_logits"], ["dims"]),
        helper.make_node("Gather", ["dims", "two"], ["height"]),
        helper.make_node("Gather", ["dims", "three"], ["width"]),
        helper.make_node("Mul", ["height", "two"], ["twice_height"]),
        helper.make_node("Greater", ["width", "twice_height"], ["wide"]),
        helper.make_node("Cast", ["wide"], ["is_wide"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["is_wide", "class1_bias"], ["shift"]),
        helper.make_node("Add", ["raw_logits", "shift"], [out]),
    ])  # fmt: skip
    return broken


@pytest.fixture(scope="module")
def narrowed(trained_run, tmp_path_factory):
    """The test run's CNN exported with an fp16 graph wrong at wide sizes (the gate's sweep on)."""
    honest_fp16 = export.pipeline.precision.to_fp16
    run = tmp_path_factory.mktemp("narrowed") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export.pipeline.precision, "to_fp16", lambda m, keep: wrong_when_wide(honest_fp16(m, keep)))
        args = ["--run", str(run), "--students", "cnn", "--variants", "fp32", "fp16", "--no-openvino",
                *TEST_EXPORT_ARGS]  # fmt: skip
        assert export_main(args) == 0
    return run


def test_an_engine_refused_only_away_from_the_serving_size_ships_for_the_widest_box_it_passes_in(narrowed):
    manifest = read_manifest(narrowed / "export" / "cnn")
    batch, smallest, largest = manifest.shapes["max"][0], manifest.shapes["min"][1:], manifest.shapes["max"][1:]
    fp16 = [e for e in manifest.engines if e.variant == "fp16"]
    assert {e.io for e in fp16} == {"labels", "logits"} and not manifest.skipped
    # Sizes from the serving size up reach (40, 112), which is wide: only the box up to the serving size is right.
    assert largest[1] > 2 * SERVING[0] and SERVING[1] <= 2 * smallest[0]
    for e in fp16:
        assert not e.parity["passed"] and min(e.parity["sizes"].values()) < 0.5  # wrong where wide...
        assert e.parity["sizes"][f"{SERVING[0]}x{SERVING[1]}@1"] >= 0.99  # ...right at the serving size
        assert e.profile["min"] == [1, *smallest] and e.profile["max"] == [batch, *SERVING]
        assert e.profile["opt"] == [1, *SERVING] and "32x112" in e.profile["reason"]
    assert all(e.profile is None for e in manifest.engines if e.variant == "fp32")
    card = (narrowed / "export" / "cnn" / "README.md").read_text()
    assert f"Only from {smallest[0]}×{smallest[1]} to {SERVING[0]}×{SERVING[1]}: `model.fp16.onnx`" in card
    shapes = manifest.profile("labels", fp16[0].profile)
    assert shapes[0] == (1, *smallest, 3) and shapes[2] == (batch, *SERVING, 3)  # TensorRT's


def test_serve_runs_other_sizes_on_the_next_engine_with_a_log_line(narrowed, caplog):
    engines = narrowed / "export"
    fp16, fp32 = load_segmenter(engines, "cnn", "ort.cpu.fp16"), load_segmenter(engines, "cnn", "ort.cpu.fp32")
    assert fp16.fallback.backend == "ort.cpu.fp32" and fp32.fallback is None
    rng = np.random.default_rng(0)
    at_serving, wide = (rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in (SERVING, WIDE))
    smallest = tuple(fp16.engines[0].manifest.shapes["min"][1:])
    for image in (at_serving, rng.integers(0, 256, (*smallest, 3), dtype=np.uint8)):  # inside its box: its own engine
        assert (fp16.predict(image).labels == fp16.engines[0].run(image[None])[0]).all()
    with caplog.at_level(logging.INFO, logger="serve.segmenter"):
        labels = fp16.predict(wide).labels
        fp16.predict(wide)
    assert (labels == fp32.predict(wide).labels).all() and (fp16.engines[0].run(wide[None])[0] == 1).all()
    said = [r.getMessage() for r in caplog.records if "outside the sizes" in r.getMessage()]
    assert said == ["cnn: 32x112 is outside the sizes its engine passed the gate at: it runs on ort.cpu.fp32"]


def test_the_bench_and_triton_keep_a_narrowed_engine_to_its_size(narrowed, tmp_path):
    out = tmp_path / "bench"
    args = ["--run", str(narrowed), "--models", "cnn", "--backends", "ort.cpu.fp16", "--batch-sizes", "1",
            "--sizes", f"{SERVING[0]}x{SERVING[1]}", f"{WIDE[0]}x{WIDE[1]}", "--seconds", "0.05", "--min-runs", "2",
            "--warmup", "0", "--eval-images", "2", "--out", str(out)]  # fmt: skip
    assert bench(args) == 0
    rows = {(r["backend"], r["width"]): r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["ort.cpu.fp16", SERVING[1]]["status"] == "ok"
    outside = rows["ort.cpu.fp16", WIDE[1]]
    assert outside["status"] == "not shipped" and "runs on ort.cpu.fp32" in outside["error"]
    repo = tmp_path / "triton"
    names = write_repository(narrowed / "export", repo, RepositoryOptions(cpu_only=True))
    config = (repo / "cnn_fp16" / "config.pbtxt").read_text()
    assert f"dims: [ {SERVING[0]}, {SERVING[1]}, 3 ]" in config and "cnn_fp32" in names
    assert "dims: [ -1, -1, 3 ]" in (repo / "cnn_fp32" / "config.pbtxt").read_text()


def test_a_plan_of_a_narrowed_engine_is_checked_at_its_size(narrowed):
    """export.tensorrt checks a plan against its ONNX source on the example images: for an engine the gate passed
    at the serving size only, at that size (here the ONNX engine stands in for the plan: no TensorRT here)."""
    from export.tensorrt import plan_agreement
    from serve.runtime import open_engine

    engine = open_engine(narrowed / "export" / "cnn", "fp16", "labels", device="cpu")
    images = [
        np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8) for i, hw in enumerate([WIDE, (50, 60)])
    ]
    assert plan_agreement(engine, engine, images) == {"batch1": 1.0, "batched": 1.0}


def test_the_boxes_tried_are_inside_the_profile_with_the_serving_size_at_a_corner():
    shapes = {"min": [1, 32, 32], "opt": [1, 64, 64], "max": [16, 128, 256]}
    upper, lower = boxes(shapes)
    assert upper == {"min": [1, 64, 64], "opt": [1, 64, 64], "max": [16, 128, 256]}
    assert lower == {"min": [1, 32, 32], "opt": [1, 64, 64], "max": [16, 64, 64]}
    assert boxes({**shapes, "max": [16, 64, 64]}) == [lower]  # the serving size is the largest: one box, below it
    assert inside(upper, "128x256@16") and not inside(upper, "128x32@16") and not inside(lower, "64x64@17")
