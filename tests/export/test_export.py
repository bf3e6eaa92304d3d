"""The export stage on a real (tiny) training run: engines, manifest, parity gate, bad input."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import export.pipeline
from export.__main__ import main
from export.card import engine_card
from export.parity import gate_sizes, normalise
from export.tensorrt import PLAN_VARIANTS
from serve.manifest import read_manifest
from serve.runtime import OnnxRuntimeEngine, open_engine
from tests.conftest import TEST_EXPORT_ARGS
from train.run_dir import load_student


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_engine_dir_is_complete_and_gated(exported_run, student):
    engine_dir = exported_run / "export" / student
    manifest = read_manifest(engine_dir)  # checks every listed file exists
    onnx_engines = [e for e in manifest.engines if e.runtime == "onnxruntime"]
    shipped = {e.variant for e in onnx_engines}
    skipped = {s["variant"] for s in manifest.skipped if s["runtime"] == "onnxruntime"}
    assert {"fp32", "fp16", "int8.qdq"} <= shipped and shipped | skipped == {"fp32", "fp16", "int8.qdq", "int8.cpu"}
    assert {(e.variant, e.io) for e in onnx_engines} == {(v, io) for v in shipped for io in ("labels", "logits")}
    assert manifest.student == student and manifest.num_classes == 5 and len(manifest.palette) == 5
    assert len(manifest.source["sha256"]) == 64 and manifest.exporter["dynamo"] is True
    assert manifest.exporter["parity"]["sizes"] == []  # conftest exports with --no-size-sweep

    parity = json.loads((engine_dir / "parity.json").read_text())
    for e in manifest.engines:
        assert e.parity["passed"] and parity[e.name] == e.parity and e.parity["sizes"] == {}
        assert set(e.parity["batch_sizes"]) == {"1", "3"}  # every benchmarked batch size
        if e.precision == "fp32":
            assert e.parity["agreement"] >= 0.999 and e.parity["miou_delta"] <= 0.001
        if e.io == "logits":
            assert "max_abs_logit_error" in e.parity["batch_sizes"]["3"]
        model = onnx.load(str(engine_dir / e.file), load_external_data=False)
        assert model.opset_import[0].version >= 18
        dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims[:1] == ["batch"] and "height" in dims and "width" in dims  # dynamic N, H, W


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_every_onnx_file_describes_itself(exported_run, student):
    engine_dir = exported_run / "export" / student
    manifest = read_manifest(engine_dir)
    metrics = json.loads((exported_run / "metrics.json").read_text())
    for e in (e for e in manifest.engines if e.runtime == "onnxruntime"):
        props = {p.key: p.value for p in onnx.load(str(engine_dir / e.file), load_external_data=False).metadata_props}
        assert json.loads(props["classes"]) == manifest.classes and json.loads(props["palette"]) == manifest.palette
        assert json.loads(props["mean"]) == [0.485, 0.456, 0.406] and json.loads(props["std"])[0] == 0.229
        assert props["input"].startswith("image: uint8 NHWC" if e.io == "labels" else "image: float32 NCHW")
        assert props["output"].startswith("labels: uint8 NHW" if e.io == "labels" else "logits: float32 NCHW")
        assert props["student"].startswith(f"{student}: ") and props["precision"].startswith(e.variant)
        assert props["weights_sha256"] == manifest.source["sha256"] and props["source_run"] == exported_run.name
        assert float(props["val_miou"]) == metrics[student]["miou"] and props["version"] == version("segdeploy")
        own = json.loads(props["segdeploy.manifest"])  # what serve reads from a lone file
        assert own["classes"] == manifest.classes and [x["file"] for x in own["engines"]] == [e.file]


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_each_engine_dir_has_a_model_card(exported_run, student):
    root = exported_run / "export"
    manifest = read_manifest(root / student)
    card = (root / student / "README.md").read_text()
    val_miou = json.loads((exported_run / "metrics.json").read_text())[student]["miou"]
    assert card.startswith(f"# {student}: {manifest.arch} on {manifest.backbone}")
    assert f"**{100 * val_miou:.2f} %**" in card and manifest.source["sha256"][:16] in card
    for e in manifest.engines:
        assert f"| `{e.file}` | {e.variant} |" in card and f"{e.parity['agreement']:.4f}" in card
    for i, (name, rgb) in enumerate(zip(manifest.classes, manifest.palette, strict=True)):
        assert f"| {i} | {name} | `#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}`" in card
    h, w = manifest.shapes["opt"][1:]
    assert f"the parity gate checked {h}×{w} only" in card and "python -m serve.predict" in card
    overview = (root / "README.md").read_text()
    assert f"| [{student}]({student}/README.md) |" in overview and f"{100 * val_miou:.2f}" in overview
    swept = replace(manifest, exporter={**manifest.exporter, "parity": {"sizes": [[32, 32], [37, 75]]}})
    card = engine_card(root / student, swept, None)
    assert "the parity gate checked 32×32, 37×75 (the profile's corners and off-grid sizes) at batch 1 and " in card


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    return types | {i.name: i.data_type for i in model.graph.initializer}


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_graphs_hold_only_what_tensorrt_parses(exported_run, student):
    """In the graphs TensorRT builds, Q/DQ on 8-bit tensors only (ONNX Runtime would quantize biases to
    INT32, which TensorRT's parser refuses); everywhere, casts to UINT8 only from float (TensorRT has
    no INT64 -> UINT8 cast)."""
    engine_dir = exported_run / "export" / student
    entries = read_manifest(engine_dir).engines
    for e in entries:
        model = onnx.load(str(engine_dir / e.file))
        types = _tensor_types(model)
        for node in model.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and e.variant in PLAN_VARIANTS:
                quantized = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
                assert types[quantized] == onnx.TensorProto.INT8, (e.file, node.name, types[quantized])
            if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.UINT8:
                assert types[node.input[0]] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16), (e.file, node.name)
    qdq = [e for e in entries if e.variant == "int8.qdq"]
    assert qdq and all(e.parity["passed"] for e in qdq)  # float biases keep the int8 gate


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_engines_run_odd_sizes_and_labels_equal_argmax_of_logits(exported_run, student):
    engine_dir = exported_run / "export" / student
    torch_student = load_student(exported_run, student)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 45, 77, 3), dtype=np.uint8)  # never seen at export
    x = normalise(pixels)
    with torch.no_grad():
        reference = torch.nn.functional.interpolate(
            torch_student(torch.from_numpy(x)).logits, size=(45, 77), mode="bilinear", align_corners=False
        ).numpy()
    for variant in {e.variant for e in read_manifest(engine_dir).engines if e.runtime == "onnxruntime"}:
        labels = open_engine(engine_dir, variant, "labels", device="cpu").run(pixels)
        logits = open_engine(engine_dir, variant, "logits", device="cpu").run(x)
        assert labels.dtype == np.uint8 and labels.shape == (3, 45, 77)
        assert logits.dtype == np.float32 and logits.shape == (3, 5, 45, 77)
        assert (labels == logits.argmax(1)).mean() >= 0.999, variant  # same graph, argmax inside
        if variant == "fp32":
            np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
            assert (labels == reference.argmax(1)).all()
        # batch 1 gives the same as the same image inside a batch of 3 (no cross-slot leakage)
        single = open_engine(engine_dir, variant, "labels", device="cpu").run(pixels[1:2])
        assert (single[0] == labels[1]).mean() >= 0.999, variant


def test_gate_keeps_a_perturbed_reduced_precision_engine_out(trained_run, tmp_path, monkeypatch, capsys):
    honest_fp16 = export.pipeline.precision.to_fp16

    def perturbed_fp16(model: onnx.ModelProto, keep_fp32: list[str]) -> onnx.ModelProto:
        """fp16 conversion plus a large bias on class 1: a broken engine the gate must stop."""
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        last_conv = [n for n in broken.graph.node if n.op_type == "Conv"][-1]
        bias = next(t for t in broken.graph.initializer if t.name == last_conv.input[2])
        values = onnx.numpy_helper.to_array(bias).copy()
        values[1] += 50.0
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        return honest_fp16(broken, keep_fp32)

    monkeypatch.setattr(export.pipeline.precision, "to_fp16", perturbed_fp16)
    out = tmp_path / "engines"
    code = main(["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32", "fp16",
                 "--no-openvino", *TEST_EXPORT_ARGS])  # fmt: skip
    assert code == 0  # fp32 passed: the export ships what passed
    manifest = read_manifest(out / "cnn")
    assert {e.variant for e in manifest.engines} == {"fp32"}
    # the default gate also ran every engine at the profile's other sizes, at batch 1 and the largest batch
    sizes = gate_sizes(manifest.shapes)
    assert len(sizes) > 1 and manifest.exporter["parity"]["sizes"] == [list(s) for s in sizes]
    for e in manifest.engines:
        assert set(e.parity["sizes"]) == {f"{h}x{w}@{b}" for h, w in sizes for b in (1, manifest.shapes["max"][0])}
    assert sorted(p.name for p in (out / "cnn").glob("*.onnx")) == ["model.fp32.logits.onnx", "model.fp32.onnx"]
    (skipped,) = manifest.skipped
    assert (
        skipped["variant"] == "fp16" and "parity gate" in skipped["reason"] and "model.fp16.onnx" in skipped["reason"]
    )
    assert "not shipped: onnxruntime fp16 (fp16): failed the parity gate" in capsys.readouterr().out


def test_cpu_int8_ships_only_where_it_pays(exported_run, trained_run, tmp_path):
    """At 40x56 no int8 CPU engine of the test run is 1.5x faster than the best float one: each is listed
    under `skipped` with its timing; asked for no speed-up, the ones within the ΔmIoU bar ship."""
    for student in ("cnn", "vit"):
        manifest = read_manifest(exported_run / "export" / student)
        cpu_int8 = {(e.runtime, e.variant) for e in manifest.engines if e.variant == "int8.cpu"}
        for s in (s for s in manifest.skipped if s["variant"] == "int8.cpu"):
            assert "the fastest float engine" in s["reason"] or "parity gate" in s["reason"]
        for runtime, variant in cpu_int8:  # shipped: it paid
            group = [e for e in manifest.engines if (e.runtime, e.variant) == (runtime, variant)]
            assert max(abs(e.parity["miou_delta"]) for e in group) <= 0.005
        verdicts = {tuple(d["engine"]): d for d in manifest.decisions}  # the decision, with its numbers
        for runtime, _ in cpu_int8:
            assert verdicts[(runtime, "int8", "int8.cpu")]["ship"] is True
        # the int8.cpu file stays exactly while an engine (ONNX Runtime's or OpenVINO's) runs it
        assert (exported_run / "export" / student / "model.int8.cpu.onnx").is_file() == bool(cpu_int8)
    out = tmp_path / "engines"
    args = ["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32", "int8.cpu"]
    args += [*TEST_EXPORT_ARGS, "--no-size-sweep"]  # the int8 rule, not the gate's sizes
    assert main([*args, "--int8-min-speedup", "0", "--int8-max-miou-delta", "1"]) == 0
    shipped = {(e.runtime, e.variant) for e in read_manifest(out / "cnn").engines}
    assert {("onnxruntime", "int8.cpu"), ("openvino", "int8.cpu")} <= shipped
    assert (out / "cnn" / "model.int8.cpu.onnx").is_file()


def test_a_cpu_int8_engine_too_slow_to_ship_is_not_gated(trained_run, tmp_path):
    """The int8 rule's speed half decides first: an engine that cannot ship whatever its accuracy is left out
    with its timing, and no gate (nor fp32 islands) is spent on it."""
    out = tmp_path / "engines"
    args = ["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32", "int8.cpu"]
    assert main([*args, *TEST_EXPORT_ARGS, "--no-size-sweep", "--int8-min-speedup", "1000"]) == 0
    manifest = read_manifest(out / "cnn")
    assert {e.variant for e in manifest.engines} == {"fp32"} and "int8_fp32_islands" not in manifest.exporter
    int8 = [d for d in manifest.decisions if d["engine"][2] == "int8.cpu"]
    assert int8 and all(not d["ship"] and d["miou_delta"] is None and "not gated" in d["reason"] for d in int8)
    assert {s["runtime"] for s in manifest.skipped if s["variant"] == "int8.cpu"} == {d["engine"][0] for d in int8}


def test_an_openvino_engine_this_cpu_cannot_run_is_listed_with_why(exported_run):
    pytest.importorskip("openvino")
    from serve.openvino import capabilities

    for student in ("cnn", "vit"):
        manifest = read_manifest(exported_run / "export" / student)
        bf16 = [e for e in manifest.engines if (e.runtime, e.precision) == ("openvino", "bf16")]
        why = manifest.left_out("openvino", "bf16", ("fp32",))
        if "BF16" in capabilities()["precisions"]:
            assert bf16 or "parity gate" in why
        else:
            assert not bf16 and why.endswith("computes no bf16 natively")


def refused_int8_args(run: Path, out: Path) -> list[str]:
    """An export of the CNN's fp32 and int8.cpu graphs whose int8 no try can pass (agreement >= 101 %), gated
    whatever its speed (--int8-min-speedup 0)."""
    return ["--run", str(run), "--out", str(out), "--students", "cnn", "--variants", "fp32", "int8.cpu",
            "--no-openvino", *TEST_EXPORT_ARGS, "--no-size-sweep", "--batch-sizes", "1",
            "--reduced-agreement", "1.01", "--int8-min-speedup", "0"]  # fmt: skip


def test_a_refused_cpu_int8_graph_is_tried_again_with_growing_fp32_islands(trained_run, tmp_path):
    """int8.cpu below its gate is quantized again with the ops reading its 2, 4, then 8 worst-quantized tensors
    kept fp32, each try recorded; none meets an impossible bar (agreement >= 101 %), so none ships and its files
    go. A try below the bar where the graph was worst is not gated further; the last try always is."""
    out = tmp_path / "engines"
    assert main(refused_int8_args(trained_run, out)) == 0
    manifest = read_manifest(out / "cnn")
    tries = manifest.exporter["int8_fp32_islands"]
    kept = [set(t["fp32"]) for t in tries]
    assert len(tries) == 4 and kept[0] == set() and kept[0] < kept[1] < kept[2] < kept[3]  # none, 2, 4, 8 tensors
    assert all(not t["passed"] and 0 < t["agreement"] <= 1 for t in tries)
    assert [t.get("at") for t in tries] == [None, "40x56", "40x56", None]  # probed at the serving size; gated
    assert {e.variant for e in manifest.engines} == {"fp32"}
    (skipped,) = (s for s in manifest.skipped if s["variant"] == "int8.cpu")
    assert "parity gate" in skipped["reason"] and not (out / "cnn" / "model.int8.cpu.onnx").exists()


def test_a_failed_islands_search_leaves_int8_refused_and_ships_the_rest(trained_run, tmp_path, monkeypatch):
    def unreadable(*args, **kwargs):
        raise RuntimeError("no Q/DQ pairs to compare")  # as qdq_loss_debug on a graph it cannot take

    monkeypatch.setattr(export.pipeline.precision, "worst_tensors", unreadable)
    out = tmp_path / "engines"
    assert main(refused_int8_args(trained_run, out)) == 0
    manifest = read_manifest(out / "cnn")
    assert manifest.exporter["int8_fp32_islands"] == "not tried: RuntimeError: no Q/DQ pairs to compare"
    assert {e.variant for e in manifest.engines} == {"fp32"}
    assert any(s["variant"] == "int8.cpu" and "parity gate" in s["reason"] for s in manifest.skipped)


def test_a_tight_memory_budget_cuts_the_profile_and_the_checked_batch_sizes(trained_run, tmp_path):
    out = tmp_path / "engines"  # 40x56, 5 classes: 0.04 MiB of logits per image
    args = ["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32", "--no-openvino"]
    assert main([*args, *TEST_EXPORT_ARGS, "--profile-budget-mib", "0.1"]) == 0
    manifest = read_manifest(out / "cnn")
    assert manifest.shapes["max"] == [2, 40, 56] and manifest.exporter["profile_budget_mib"] == 0.1
    assert {e.file: set(e.parity["batch_sizes"]) for e in manifest.engines} == {
        "model.fp32.onnx": {"1"},
        "model.fp32.logits.onnx": {"1"},
    }  # batch 3 is outside the profile: not checked


def test_failed_fp32_gate_exits_1_and_writes_nothing(trained_run, tmp_path, capsys):
    out = tmp_path / "engines"
    code = main(["--run", str(trained_run), "--out", str(out), "--students", "cnn", "--variants", "fp32",
                 "--fp32-agreement", "1.01", *TEST_EXPORT_ARGS, "--no-openvino", "--no-size-sweep"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "model.fp32.onnx" in err
    assert list(out.iterdir()) == []  # no engine dir, no temp dir left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--students", "cnn", "teacher"], "unknown student 'teacher'"),
        (["--variants", "fp32", "int4"], "unknown precision variant 'int4'"),
        (["--variants", "fp16"], "fp32 variant is required"),
    ],
)
def test_bad_options_exit_2_with_a_message(trained_run, capsys, args, message):
    assert main(["--run", str(trained_run), *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_run_dirs_exit_2_with_a_message(trained_run, tmp_path, capsys):
    assert main(["--run", str(tmp_path / "nowhere")]) == 2
    assert "not a run dir" in capsys.readouterr().err

    # weights that do not fit the config (another class count)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("cnn.safetensors", "vit.safetensors"):
        (broken / name).write_bytes((trained_run / name).read_bytes())
    text = (trained_run / "config.yaml").read_text().replace("num_classes: 5", "num_classes: 7")
    (broken / "config.yaml").write_text(text)
    assert main(["--run", str(broken), "--students", "cnn"]) == 2
    assert "does not match the student" in capsys.readouterr().err

    # an output location that cannot be a directory
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--run", str(trained_run), "--out", str(blocker / "engines"), "--students", "cnn"]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_engine_from_bytes_matches_file(exported_run):
    path = exported_run / "export" / "cnn" / "model.fp32.onnx"
    pixels = np.zeros((1, 40, 56, 3), np.uint8)
    a = OnnxRuntimeEngine(path, device="cpu").run(pixels)
    b = OnnxRuntimeEngine(path.read_bytes(), device="cpu").run(pixels)
    assert (a == b).all()


def test_the_gate_checks_many_sizes_and_fails_an_engine_wrong_at_one_aspect_ratio(exported_run):
    """The profile's corners and off-grid sizes, at batch 1 and the largest batch: an engine that is right at
    the serving size but wrong where the image is much wider than high fails, and the gate says where."""
    from export.parity import Candidate, check, failures, gate_sizes, torch_reference
    from serve.runtime import open_engine
    from train.data import build_dataset
    from train.run_dir import load_run_config, load_student

    engine_dir = exported_run / "export" / "cnn"
    manifest = read_manifest(engine_dir)
    sizes = gate_sizes(manifest.shapes)
    assert (32, 112) in sizes and (80, 32) in sizes and any(h % 32 and w % 32 for h, w in sizes)
    engine = open_engine(engine_dir, "fp32", "labels", device="cpu")

    def wide_wrong(pixels):
        labels = engine.run(pixels)
        return (labels + 1) % 5 if pixels.shape[2] > 3 * pixels.shape[1] else labels  # wrong at 32x112 only

    cfg = load_run_config(exported_run)
    candidates = [Candidate("right", "labels", "fp32", engine.run), Candidate("wide", "labels", "fp32", wide_wrong)]
    reference = torch_reference(load_student(exported_run, "cnn", cfg))
    val = build_dataset(cfg.data, "val", train=False)
    reports = check(reference, candidates, val, 4, [1], shapes=manifest.shapes)
    assert reports["right"]["passed"] and min(reports["right"]["sizes"].values()) >= 0.999
    assert set(reports["right"]["sizes"]) == {f"{h}x{w}@{b}" for h, w in sizes for b in (1, 4)}
    assert not reports["wide"]["passed"] and reports["wide"]["batch_sizes"]["1"]["agreement"] >= 0.999
    (line,) = failures(reports)
    assert line.startswith("wide: ") and "worst at size 32x112@" in line


def test_the_gate_runs_every_shape_it_checks_once_and_fills_up_a_short_last_batch(exported_run):
    """OpenVINO compiles per shape: every batch of a batch size has one shape (a short last batch is filled up
    with the next images, or with repeats that count for nothing), and the sweep does not run again the points
    the gate's own batches covered (the serving size at batch 1 and the largest)."""
    from export.parity import Candidate, batches, check, torch_reference
    from serve.runtime import open_engine
    from train.data import build_dataset
    from train.run_dir import load_run_config, load_student

    cfg = load_run_config(exported_run)
    val = build_dataset(cfg.data, "val", train=False)
    assert len(val) >= 4
    shapes = [(p.shape, int(real.sum()) // (p.shape[1] * p.shape[2])) for p, _, real in batches(val, 3, 2)]
    assert shapes == [((2, 40, 56, 3), 2), ((2, 40, 56, 3), 2)]  # 4 real images, no batch of 1

    class Two:  # the split's first two images: a batch of 4 repeats them, masked out
        classes = val.classes

        def __len__(self):
            return 2

        def read(self, i):
            return val.read(i)

    ((pixels, labels, real),) = batches(Two(), 5, 4)
    assert (pixels[2:] == pixels[:2]).all() and real[:2].all() and not real[2:].any() and (labels[2:] == 255).all()

    engine_dir = exported_run / "export" / "cnn"
    manifest = read_manifest(engine_dir)
    engine, seen = open_engine(engine_dir, "fp32", "labels", device="cpu"), []
    reference = torch_reference(load_student(exported_run, "cnn", cfg))
    report = check(reference, [Candidate("fp32", "labels", "fp32", lambda x: seen.append(x.shape) or engine.run(x))],
                   val, 4, [1, 4], shapes=manifest.shapes)["fp32"]  # fmt: skip
    at_serving = [s for s in seen if s[1:3] == (40, 56)]
    assert at_serving == [(1, 40, 56, 3)] * 4 + [(4, 40, 56, 3)]  # the gate's own batches, not the sweep's
    assert {"40x56@1", "40x56@4"} <= set(report["sizes"]) and len(set(seen)) == len(report["sizes"])


def test_the_reference_runs_once_per_input_while_its_outputs_fit_the_budget():
    from export.parity import memoised

    calls = []
    reference = memoised(lambda x: calls.append(x.shape) or x * 2, budget_mib=3 * 64 / 2**20)  # 3 outputs of 64 B
    images = [np.full((1, 2, 2, 4), i, np.float32) for i in range(4)]
    for x in images + images:
        assert (reference(x) == 2 * x).all()
    assert len(calls) == 4 + 1  # the fourth did not fit: it runs again
    assert (reference(images[0].copy()) == 0).all() and len(calls) == 5  # the same bytes, another array


def test_the_logit_error_counts_the_real_pixels_of_every_class_and_never_the_padding():
    """A batch of images of different sizes is padded to the largest: an error there is no engine's."""
    from export.parity import _Tally

    ref = np.zeros((2, 3, 4, 5), np.float32)
    logits = ref.copy()
    logits[0, :, :2] = 0.5  # every class of 10 real pixels
    logits[1, 1, 3, 4] = 9.0  # a padded pixel
    real = np.ones((2, 4, 5), bool)
    real[1, 3] = False
    tally = _Tally(3)
    tally.add_logits(logits.astype(np.float16), ref, real)
    assert tally.max_err == 0.5 and tally.err_count == 35 * 3
    assert tally.err_sum == pytest.approx(0.5 * 10 * 3)


def test_the_fp16_graph_keeps_only_the_listed_op_types_in_fp32():
    """By default only the final resize stays fp32 (normalisation and softmax in fp32 made the ViT 1.49x slower on
    ONNX Runtime CUDA); --fp16-keep-fp32 adds op types, each then fed and read through Cast nodes."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])
    init = [onnx.numpy_helper.from_array(np.ones(8, np.float32), n) for n in ("scale", "bias")]
    init.append(onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    init.append(onnx.numpy_helper.from_array(np.full([1, 4, 8, 8], 2, np.float32), "two"))
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("LayerNormalization", ["m", "scale", "bias"], ["n"], axis=-1),
        helper.make_node("Softmax", ["n"], ["s"], axis=1),
        helper.make_node("Add", ["s", "two"], ["a"]),
        helper.make_node("Resize", ["a", "", "scales"], ["y"], mode="linear"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def fp32_ops(graph: onnx.ModelProto) -> set[str]:
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.value_info, *graph.graph.input]}
        fp32 = [n for n in graph.graph.node if types.get(n.input[0]) == TensorProto.FLOAT]
        return {n.op_type for n in fp32 if n.op_type != "Cast"}

    assert fp32_ops(export.pipeline.precision.to_fp16(model)) == {"Resize"}
    kept = export.pipeline.precision.to_fp16(model, [*export.pipeline.precision.FP16_KEEP_FP32, "LayerNormalization"])
    assert fp32_ops(kept) == {"Resize", "LayerNormalization"}


def test_the_cpu_int8_graph_keeps_patchify_convs_fp32_and_calibrates_on_images_of_any_size():
    """int8.cpu leaves the convolutions whose kernel equals their stride (SegFormer's sequence reduction, which
    OpenVINO's int8 kernels got wrong on small inputs) in fp32; int8.qdq (TensorRT) quantizes them. The percentile
    calibration takes one image at a time, so calibration images of different sizes (a real dataset's) work."""
    from onnx import TensorProto, helper

    from export.precision import patchify_convs, to_int8

    rng = np.random.default_rng(0)
    weights = {"w_patch": (4, 3, 2, 2), "w_dense": (4, 4, 3, 3), "w_down": (4, 4, 1, 1)}
    init = [onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in weights.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w_patch"], ["a"], name="patch", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["a", "w_dense"], ["b"], name="dense", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_down"], ["y"], name="down", kernel_shape=[1, 1], strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h4", "w4"])
    graph = helper.make_graph(nodes, "g", [x], [y], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert patchify_convs(model) == ["patch"]

    def quantized(graph: onnx.ModelProto) -> set[str]:  # the convs whose weights are int8
        dequantized = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name for n in graph.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}

    images = [rng.normal(size=(1, 3, h, w)).astype(np.float32) for h, w in ((16, 16), (24, 40), (32, 8))]
    assert quantized(to_int8(model, images, "int8.cpu")) == {"dense", "down"}
    assert quantized(to_int8(model, images, "int8.qdq")) == {"patch", "dense", "down"}
    assert quantized(to_int8(model, images, "int8.cpu", keep_fp32=["down"])) == {"dense"}


def test_fp16_keep_fp32_reaches_the_graph_and_the_manifest_through_the_cli(trained_run, tmp_path, capsys):
    from onnx import TensorProto

    out = tmp_path / "export"
    args = ["--run", str(trained_run), "--students", "vit", "--variants", "fp32", "fp16", "--out", str(out)]
    args += ["--no-openvino", "--no-size-sweep", *TEST_EXPORT_ARGS]
    assert main([*args, "--fp16-keep-fp32", "LayerNormalization"]) == 0
    manifest = read_manifest(out / "vit")
    assert manifest.exporter["fp16_keep_fp32"] == [*export.pipeline.precision.FP16_KEEP_FP32, "LayerNormalization"]
    graph = onnx.shape_inference.infer_shapes(onnx.load(out / "vit" / "model.fp16.logits.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.graph.value_info, *graph.graph.input]}
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types.get(n.input[0]) == TensorProto.FLOAT for n in norms)  # fed fp32 through Casts
    with pytest.raises(SystemExit):
        main([*args, "--fp16-keep-fp32", "LayerNorm"])
    assert "--fp16-keep-fp32: 'LayerNorm' is not an ONNX op type" in capsys.readouterr().err


@pytest.mark.parametrize("student", ["cnn", "vit"])
def test_the_logits_graphs_batch_is_symbolic_and_runs_batch_1(exported_run, student):
    """torch.export specialises a size-1 dim, and once left the constant 2 for a batch traced with max 2."""
    graph = onnx.load(str(exported_run / "export" / student / "model.fp32.logits.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a constant
    out = OnnxRuntimeEngine(graph.SerializeToString(), device="cpu").run(np.zeros((1, 3, 48, 80), np.float32))
    assert out.shape == (1, 5, 48, 80)


class _TinyStudent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor):
        from train.models.common import StudentOutput

        logits = self.conv(x)
        return StudentOutput([logits], logits, logits)


def test_a_trace_is_reused_for_the_same_student_only_and_a_damaged_one_is_traced_again(tmp_path, monkeypatch):
    from export.graphs import cached_logits, trace_cache

    monkeypatch.setenv("SEGDEPLOY_CACHE", str(tmp_path))
    student = _TinyStudent().eval()
    first, cached = cached_logits(student, "weights a", (40, 56))
    again, cached_again = cached_logits(student, "weights a", (40, 56))
    assert (cached, cached_again) == (False, True) and again.SerializeToString() == first.SerializeToString()
    assert cached_logits(student, "weights b", (40, 56))[1] is False  # other weights: traced
    assert cached_logits(student, "weights a", (48, 56))[1] is False  # other trace settings
    entries = sorted(trace_cache().glob("*.onnx"))
    assert len(entries) == 3 and not list(trace_cache().glob("*.part"))
    for entry in entries:
        entry.write_bytes(b"half a file")
    assert cached_logits(student, "weights a", (40, 56))[1] is False  # unreadable: traced again
    assert cached_logits(student, "weights a", (40, 56))[1] is True  # and rewritten whole
    monkeypatch.setenv("SEGDEPLOY_CACHE", "off")
    assert trace_cache() is None and cached_logits(student, "weights c", (40, 56))[1] is False


def test_the_second_export_of_a_run_reuses_its_trace_and_ships_the_same_graph(exported_run, tmp_path):
    out = tmp_path / "again"
    assert main(["--run", str(exported_run), "--out", str(out), "--students", "vit", "--variants", "fp32",
                 "--no-openvino", "--no-size-sweep", *TEST_EXPORT_ARGS]) == 0  # fmt: skip
    manifest = read_manifest(out / "vit")
    assert manifest.exporter["cached_trace"] is True
    first, second = (onnx.load(str(d / "vit" / "model.fp32.logits.onnx")) for d in (exported_run / "export", out))
    assert [n.op_type for n in first.graph.node] == [n.op_type for n in second.graph.node]
    weights = lambda graph: {i.name: i.raw_data for i in graph.graph.initializer}  # noqa: E731
    assert weights(first) == weights(second)


def test_an_engine_set_goes_live_in_one_step_and_the_previous_one_is_removed(tmp_path):
    from export.pipeline import VERSIONS, swap_into_place

    final = tmp_path / "export" / "cnn"
    final.mkdir(parents=True)
    (final / "manifest.json").write_text("earlier layout")  # a real dir, as earlier versions wrote
    for n in (1, 2):
        built = tmp_path / "export" / f".cnn-build{n}"
        built.mkdir()
        (built / "manifest.json").write_text(f"set {n}")
        swap_into_place(built, final)
        assert final.is_symlink() and (final / "manifest.json").read_text() == f"set {n}"
        assert not built.exists() and len(list((final.parent / VERSIONS).iterdir())) == 1  # the older ones went
    assert not Path(os.readlink(final)).is_absolute()  # relative: the export dir can be moved or copied whole


def test_the_gate_holds_one_shape_of_each_engine_at_a_time(exported_run):
    """The gate runs every engine at once over many shapes: ONNX Runtime without its memory arena, OpenVINO with
    one compiled shape (kept eight, a B0 with 150 classes filled 22 GB); what ships opens as serve opens it."""
    from export.pipeline import runner

    engine_dir = exported_run / "export" / "cnn"
    entries = read_manifest(engine_dir).engines
    pixels = [np.zeros((1, h, w, 3), np.uint8) for h, w in ((32, 32), (40, 56))]
    ort_entry = next(e for e in entries if e.runtime == "onnxruntime" and e.io == "labels")
    for gate in (True, False):
        session = runner(ort_entry, engine_dir, gate=gate).__self__.session
        assert session.get_session_options().enable_cpu_mem_arena is not gate
    ov_entry = next((e for e in entries if e.runtime == "openvino" and e.io == "labels"), None)
    if ov_entry is None:
        pytest.skip("no OpenVINO engine here")
    for gate, kept in ((True, 1), (False, 2)):
        run = runner(ov_entry, engine_dir, gate=gate)
        for p in pixels:
            run(p)
        assert len(run.__self__._by_shape) == kept
