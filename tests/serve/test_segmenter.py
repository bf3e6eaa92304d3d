"""The torch-free runtime on a real exported run: one interface for every model, batches, ensemble."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from serve.manifest import read_manifest
from serve.runtime import OnnxRuntimeEngine, open_engine
from serve.segmenter import MODELS, choices, load_segmenter
from tests.conftest import REPO


def _images(count: int, size=(40, 56), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def test_a_student_predicts_what_its_labels_engine_computes(engines):
    segmenter = load_segmenter(engines, "cnn")
    image = _images(1)[0]
    prediction = segmenter.predict(image)
    direct = open_engine(engines / "cnn", "fp32", "labels").run(image[None])[0]
    assert prediction.labels.shape == image.shape[:2] and prediction.labels.dtype == np.uint8
    np.testing.assert_array_equal(prediction.labels, direct)
    assert set(prediction.timings) == {"preprocess", "inference", "postprocess"}
    assert all(v >= 0 for v in prediction.timings.values()) and prediction.timings["inference"] > 0


def test_the_ensemble_is_the_argmax_of_the_mean_softmax_of_both_logits_engines(engines):
    image = _images(1, seed=3)[0]
    ensemble = load_segmenter(engines, "ensemble").predict(image).labels
    m = read_manifest(engines / "cnn")
    x = (image.astype(np.float32) / 255 - np.array(m.preprocess["mean"])) / np.array(m.preprocess["std"])
    x = x.astype(np.float32).transpose(2, 0, 1)[None]
    probs = []
    for student in ("cnn", "vit"):
        logits = open_engine(engines / student, "fp32", "logits").run(x)[0].astype(np.float64)
        e = np.exp(logits - logits.max(0))
        probs.append(e / e.sum(0))
    expected = np.mean(probs, axis=0).argmax(0)
    assert (ensemble == expected).mean() > 0.999  # float32 vs float64 softmax may flip a tie


def test_batches_equal_single_images_and_respect_the_max_batch(engines):
    segmenter = load_segmenter(engines, "vit")
    images = _images(5) + _images(2, size=(50, 70), seed=1)  # two sizes, more than max batch (4)
    batched = segmenter.predict_batch(images)
    assert [p.batch for p in batched] == [4, 4, 4, 4, 1, 2, 2]
    for image, p in zip(images, batched, strict=True):
        np.testing.assert_array_equal(p.labels, segmenter.predict(image).labels)


def test_any_image_size_is_fitted_into_the_shape_range_and_mapped_back(engines):
    segmenter = load_segmenter(engines, "cnn")
    (lo_h, lo_w), (hi_h, hi_w) = segmenter.min_hw, segmenter.max_hw
    assert segmenter.fit(hi_h * 4, hi_w * 2) == (hi_h, hi_w // 2)  # aspect kept, shrunk into the max
    assert segmenter.fit(10, 10) == (lo_h, lo_w)
    for size in [(9, 300), (300, 9), (500, 700)]:
        h, w = segmenter.fit(*size)
        assert lo_h <= h <= hi_h and lo_w <= w <= hi_w
        image = _images(1, size=size)[0]
        assert segmenter.predict(image).labels.shape == size


def test_bad_arrays_and_unknown_choices_are_refused(engines):
    segmenter = load_segmenter(engines, "cnn")
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        segmenter.predict(np.zeros((40, 56), dtype=np.uint8))
    with pytest.raises(ValueError, match="unknown model"):
        load_segmenter(engines, "resnet")
    with pytest.raises(ValueError, match="unknown backend"):
        load_segmenter(engines, "cnn", backend="coreml")
    with pytest.raises(FileNotFoundError, match="no engine dirs"):
        load_segmenter(engines / "cnn", "cnn")


def test_choices_list_every_model_and_backend_present(engines):
    found = choices(engines)
    # Which variants ship may differ per student (int8.cpu only where it was faster at export).
    for student in ("cnn", "vit"):
        for e in (e for e in read_manifest(engines / student).engines if e.io == "labels"):
            runs_it = [b for m, b in found if m == student and b.runtime == e.runtime and b.precision == e.precision]
            assert any(e.variant in b.variants for b in runs_it), e.key  # every shipped engine is reachable
    assert {b.runtime for _, b in found} <= {"onnxruntime", "openvino"}  # no plans in this export
    assert {b.name for m, b in found if m == "ensemble"} <= {b.name for m, b in found if m == "cnn"}
    image = _images(1, seed=3)[0]
    reference = {m: load_segmenter(engines, m, "ort.cpu.fp32").predict(image).labels for m in MODELS}
    for model, backend in found:
        if backend.device == "cpu":  # each opens and segments as the fp32 engine does (reduced ones up to the gate)
            labels = load_segmenter(engines, model, backend).predict(image).labels
            assert labels.shape == image.shape[:2] and (labels == reference[model]).mean() > 0.9, (model, backend)


def test_reduced_precision_engines_agree_with_fp32(engines):
    images = _images(3, seed=5)
    reference = load_segmenter(engines, "ensemble", "ort.cpu.fp32").predict_batch(images)
    for backend, variant in (("ort.cpu.fp16", None), ("ort.cpu.int8", "int8.qdq")):
        candidate = load_segmenter(engines, "ensemble", backend, variant=variant).predict_batch(images)
        agreement = np.mean([(a.labels == b.labels).mean() for a, b in zip(reference, candidate, strict=True)])
        assert agreement > 0.9, variant


def test_cpu_engines_run_without_io_binding(engines):
    engine = open_engine(engines / "cnn", device="cpu")
    assert isinstance(engine, OnnxRuntimeEngine) and not engine.on_gpu and engine.device == "cpu"


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_gpu_provider_that_fails_to_load_raises_instead_of_running_on_the_cpu(engines, monkeypatch, device):
    # onnxruntime-gpu lists its providers even where their libraries are missing; the CPU wheel, told
    # they are available, opens the session without them exactly as such a host does.
    import onnxruntime

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()):
        pytest.skip(
            "this host's ONNX Runtime has GPU providers: a provider that fails to load is simulated on the CPU wheel"
        )
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)
    with pytest.raises(RuntimeError, match=f"could not enable {listed[device == 'cuda']}.*model.*active: CPU"):
        open_engine(engines / "cnn", device=device)
    engine = open_engine(engines / "cnn", device="auto")  # auto falls back, says so, and reports the truth
    assert engine.device == "cpu" and not engine.on_gpu


def test_onnxruntimes_tensorrt_provider_gets_the_manifests_profile_and_caches(engines):
    from serve.runtime import tensorrt_provider_options

    manifest = read_manifest(engines / "cnn")
    for entry in manifest.engines:
        opts = tensorrt_provider_options(engines / "cnn" / entry.file, manifest, entry)
        low, _, high = manifest.profile(entry.io)
        assert opts["trt_profile_min_shapes"] == "image:" + "x".join(map(str, low))
        assert opts["trt_profile_max_shapes"] == "image:" + "x".join(map(str, high))
        assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"].startswith(str(engines))
        assert opts["trt_fp16_enable"] == str(entry.variant == "fp16")
    n, h, w = manifest.shapes["max"]
    assert manifest.profile("labels")[2] == (n, h, w, 3) and manifest.profile("logits")[2] == (n, 3, h, w)


SERVE_WITHOUT_TORCH = """
import json, sys
import numpy as np
from serve.app import Demo, build_app
from serve.segmenter import load_segmenter
from serve.runtime import open_engine
import serve.predict  # the batch CLI too
engines = sys.argv[1]
labels = load_segmenter(engines, "ensemble").predict(np.zeros((40, 56, 3), np.uint8)).labels
build_app(Demo(engines))
print(json.dumps({"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                  "train": [m for m in sys.modules if m.split(".")[0] in ("train", "export")],
                  "shape": list(labels.shape)}))
"""


def test_serving_never_imports_torch(engines):
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(engines)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"torch": [], "train": [], "shape": [40, 56]}


def test_both_onnxruntime_wheels_in_one_environment_are_refused(tmp_path):
    # A second, real distribution record: what `pip install onnxruntime-gpu` beside onnxruntime leaves.
    record = tmp_path / "onnxruntime_gpu-1.23.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.23.0\n")
    code = "from serve.backends import import_onnxruntime\nimport_onnxruntime()"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": ""},
    )  # fmt: skip
    assert result.returncode != 0
    assert "both onnxruntime and onnxruntime-gpu are installed" in result.stderr
