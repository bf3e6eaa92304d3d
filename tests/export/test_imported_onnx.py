"""ONNX segmentation graphs made elsewhere, through the ordinary export: graphs exported by torch.onnx from
torchvision's and segmentation_models_pytorch's models (random weights, no download), checked against the source
model's own forward; hand-made graphs for the layouts, normalisations and strides users bring, and for bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from benchmarks.bench import main as bench
from export.__main__ import main
from serve.manifest import read_manifest, sha256
from serve.segmenter import load_segmenter

# fp32 on ONNX Runtime only, few images, batches of 1 and 2 (the sweep's largest batch: 2)
LIGHT = ["--variants", "fp32", "--no-openvino", "--parity-images", "4", "--calib-images", "4"]
LIGHT += ["--batch-sizes", "1", "2", "--max-batch", "2"]
SIZES = ((64, 96), (80, 80), (45, 131))


def settled(model: torch.nn.Module, size=(64, 96)) -> torch.nn.Module:
    """A random-weight model whose class maps are not one class everywhere: BatchNorm statistics from a pass
    over random images (untrained BatchNorm makes torchvision's heads predict a single class)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, *size) * 4 - 2)
    return model.eval()


class Out(torch.nn.Module):
    """torchvision's segmentation models return {"out": ...}: the tensor users export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out["out"] if isinstance(out, dict) else out


def export_onnx(model: torch.nn.Module, path, size=(64, 96), dynamic: bool = True, dynamo: bool = False) -> None:
    x = torch.randn(1, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = {0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=32, max=1024),
                    3: torch.export.Dim("w", min=32, max=1024)}  # fmt: skip
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["out"],
                              dynamic_shapes={"x": dims} if dynamic else None)  # fmt: skip
        else:
            axes = {"input": {0: "n", 2: "h", 3: "w"}, "out": {0: "n", 2: "h", 3: "w"}} if dynamic else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["out"], dynamic_axes=axes)  # fmt: skip


def source_labels(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The source model's class map, normalised as torchvision's and smp's ImageNet weights expect."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        logits = model(x)
    logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy()


def lraspp():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return Out(settled(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6))).eval()


def deeplabv3():
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    return Out(settled(deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6))).eval()


def unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    return settled(smp.Unet("resnet18", encoder_weights=None, classes=6))


SOURCES = {  # model, exported with dynamic sizes, by the dynamo exporter (its weights in a .data file beside)
    "torchvision lraspp, dynamic": (lraspp, True, False),
    "torchvision deeplabv3, dynamo, fixed 64x96": (deeplabv3, False, True),
    "smp Unet, dynamic": (unet, True, False),
}


@pytest.mark.parametrize("source", SOURCES)
def test_an_onnx_graph_becomes_gated_engines_that_segment_as_its_source_does(tmp_path, capsys, source):
    make, dynamic, dynamo = SOURCES[source]
    model = make()
    graph = tmp_path / "model.onnx"
    export_onnx(model, graph, dynamic=dynamic, dynamo=dynamo)
    names = ["background", "road", "car", "person", "sky", "tree"]
    (tmp_path / "classes.yaml").write_text("names: [" + ", ".join(names) + "]\n")
    run = tmp_path / "run"
    args = [
        "--from-onnx",
        str(graph),
        "--classes",
        str(tmp_path / "classes.yaml"),
        "--run",
        str(run),
        "--size",
        "64",
        "96",
    ]
    assert main([*args, *LIGHT]) == 0

    manifest = read_manifest(run / "export" / "cnn")
    assert manifest.classes == names and manifest.arch == "onnx" and manifest.shapes["opt"][1:] == [64, 96]
    imported = manifest.source["imported"]
    assert imported["format"] == "onnx" and imported["sha256"] == sha256(graph) and imported["gate_masks"] == "source"
    assert manifest.shapes["max"] == ([2, 128, 192] if dynamic else [1, 64, 96])
    assert "Imported from the onnx graph" in (run / "export" / "cnn" / "README.md").read_text()

    assert bench(["--run", str(run)]) == 2  # no PyTorch student to bench against, and it says so
    assert f"{run / 'cnn.onnx'} is an imported ONNX graph" in capsys.readouterr().err

    segmenter = load_segmenter(run / "export", "cnn", "ort.cpu.fp32")
    assert segmenter.classes == names
    base = Image.open(sorted((run / "export" / "examples").glob("*.png"))[0]).convert("RGB")
    for h, w in SIZES if dynamic else SIZES[:1]:
        image = np.asarray(base.resize((w, h), Image.BILINEAR))
        expected = source_labels(model, image)
        assert len(np.unique(expected)) >= 2  # a map with something to agree on
        agreement = (segmenter.predict(image).labels == expected).mean()
        assert agreement >= 0.999, (h, w, agreement)


class Nhwc(torch.nn.Module):
    """A graph unlike this project's: NHWC input in [-1, 1] (mean 0.5, std 0.5), logits at stride 4."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(16, classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


def test_another_layout_normalisation_and_stride_with_the_users_masks(tmp_path):
    """The wrapper maps ImageNet's normalisation to the source's, NHWC, and resizes stride-4 logits to the input
    as a bilinear upsample does; the gate's mIoU comes from the user's masks when --images has them."""
    model = Nhwc(3).eval()
    graph = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 48, 64, 3),), str(graph), dynamo=False, input_names=["pixels"],
                          dynamic_axes={"pixels": {0: "n", 1: "h", 2: "w"}})  # fmt: skip
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / "data" / "images" / f"{i}.jpg"
        )
        Image.fromarray(rng.integers(0, 3, (48, 64), dtype=np.uint8)).save(tmp_path / "data" / "masks" / f"{i}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    run = tmp_path / "run"
    args = ["--from-onnx", str(graph), "--classes", str(tmp_path / "classes.json"), "--run", str(run),
            "--images", str(tmp_path / "data"), "--mean", *["0.5"] * 3, "--std", *["0.5"] * 3]  # fmt: skip
    assert main([*args, "--variants", "fp32", "--no-openvino"]) == 0  # an import's gate defaults
    manifest = read_manifest(run / "export" / "cnn")
    assert manifest.source["imported"]["gate_masks"] == "given" and manifest.shapes["opt"][1:] == [48, 64]
    assert manifest.exporter["parity"]["batch_sizes"] == [1, 4] and manifest.shapes["max"][0] == 4
    engine = manifest.engines[0].parity["batch_sizes"]["1"]
    assert engine["miou"] < 0.6  # scored against the random masks given, not against the source itself

    segmenter = load_segmenter(run / "export", "cnn", "ort.cpu.fp32")
    for h, w in ((48, 64), (80, 80), (45, 101)):  # inside the profile (up to 96x128): no scaling by serve
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(image).float()[None] / 127.5 - 1
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(x), size=(h, w), mode="bilinear", align_corners=False)
        agreement = (segmenter.predict(image).labels == logits[0].argmax(0).numpy()).mean()
        assert agreement >= 0.999, (h, w, agreement)


def _graph(path, shapes, out=None, kind=TensorProto.FLOAT, op="Identity") -> None:
    """A one-node graph: inputs a, b, ... of `shapes` -> c of shape `out` (default: the first input's)."""
    inputs = [helper.make_tensor_value_info(chr(97 + i), kind, s) for i, s in enumerate(shapes)]
    outputs = [helper.make_tensor_value_info("c", kind, out or shapes[0])]
    graph = helper.make_graph([helper.make_node(op, [i.name for i in inputs], ["c"])], "g", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


IMAGE = [1, 3, 8, 8]
BAD = {
    "no file": (lambda p: None, "no such ONNX file"),
    "not onnx": (lambda p: p.write_bytes(b"\x00not a graph"), "not an ONNX model"),
    "two inputs": (lambda p: _graph(p, [IMAGE, IMAGE], op="Add"), "(fp32) image input, found a [1, 3, 8, 8], b"),
    "int input": (lambda p: _graph(p, [IMAGE], kind=TensorProto.INT64), "expected one 4-D float (fp32) image input"),
    "no channels": (lambda p: _graph(p, [[1, 5, 8, 8]]), "has 3 channels at neither dim 1 nor dim 3"),
    "3-D output": (lambda p: _graph(p, [IMAGE], [3, 8, 8], op="Squeeze"), "no output is N x C x h x w float"),
    "wrong class count": (lambda p: _graph(p, [IMAGE]), "output c has 3 channels, "),
}


@pytest.mark.parametrize("case", BAD)
def test_a_graph_that_does_not_fit_is_named_before_anything_is_written(tmp_path, capsys, case):
    make, said = BAD[case]
    graph = tmp_path / "model.onnx"
    make(graph)
    classes = tmp_path / "classes.yaml"
    classes.write_text("[a, b]\n" if case == "wrong class count" else "[a, b, c]\n")
    run = tmp_path / "runs" / "imported"
    assert main(["--from-onnx", str(graph), "--classes", str(classes), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert said in err and str(graph) in err, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no half-written run dir


@pytest.mark.parametrize(
    "text, said",
    [("{names: [a, b], palette: [[0, 0, 0]]}", "one [r, g, b] per class"), ("3", "expected a list of class names"),
     ("{1: a, 2: b}", "expected a list of class names"), ("[a, b", "not readable as YAML or JSON")],
)  # fmt: skip
def test_a_classes_file_that_does_not_fit_is_named(tmp_path, capsys, text, said):
    _graph(tmp_path / "model.onnx", [IMAGE])
    (tmp_path / "classes.yaml").write_text(text)
    assert main(["--from-onnx", str(tmp_path / "model.onnx"), "--classes", str(tmp_path / "classes.yaml"),
                 "--run", str(tmp_path / "run")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert said in err and "classes.yaml" in err, err
    assert not (tmp_path / "run").exists()
