"""Models trained elsewhere, through the ordinary export: transformers SegFormer checkpoints written by
transformers itself (random weights, the hub configs' shapes), checked against transformers' own forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.bench import main as bench
from export.__main__ import main
from serve.manifest import read_manifest, sha256
from serve.segmenter import load_segmenter
from tests.conftest import TEST_EXPORT_ARGS
from train.data.cityscapes import CLASSES as CITYSCAPES
from train.run_dir import load_run_config, load_student

transformers = pytest.importorskip("transformers")
from tests.train.test_pretrained import segformer  # noqa: E402  (needs transformers)

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def checkpoint(folder, names: list[str], size=(64, 96)):
    """`save_pretrained`'s folder of a SegFormer-B0 for `names`, with a preprocessor config for `size`."""
    model = segformer(len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.save_pretrained(folder)
    processor = {**IMAGENET, "size": {"height": size[0], "width": size[1]}, "do_reduce_labels": False}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return model


def transformers_labels(model, image: np.ndarray) -> np.ndarray:
    """transformers' class map: its logits upsampled to the input, as its post-processing does."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    mean, std = (torch.tensor(IMAGENET[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
    x = (x - mean) / std
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    up = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy()


def test_a_transformers_segformer_becomes_gated_engines_that_segment_as_it_does(tmp_path):
    names = list(CITYSCAPES.names)
    src = tmp_path / "segformer-b0-finetuned-cityscapes"
    hf = checkpoint(src, names)
    run = tmp_path / "run"
    args = ["--from-transformers", str(src), "--run", str(run), "--variants", "fp32", "--no-openvino"]
    assert main([*args, *TEST_EXPORT_ARGS, "--no-size-sweep"]) == 0  # the sizes: against transformers, below
    manifest = read_manifest(run / "export" / "vit")
    assert manifest.classes == names and len(manifest.palette) == 19 and manifest.shapes["opt"][1:] == [64, 96]
    imported = manifest.source["imported"]
    assert imported["format"] == "transformers" and imported["architecture"] == "MiT-B0"
    assert imported["sha256"] == sha256(src / "model.safetensors")
    assert imported["transformers"] == transformers.__version__
    assert "Imported from the transformers checkpoint" in (run / "export" / "vit" / "README.md").read_text()
    assert not (run / "export" / "cnn").exists()  # the run holds the vit alone

    segmenter = load_segmenter(run / "export", "vit", "ort.cpu.fp32")
    base = Image.open(sorted((run / "export" / "examples").glob("*.png"))[0]).convert("RGB")
    for h, w in ((64, 96), (80, 80), (45, 131)):
        image = np.asarray(base.resize((w, h), Image.BILINEAR))
        agreement = (segmenter.predict(image).labels == transformers_labels(hf, image)).mean()
        assert agreement >= 0.999, (h, w, agreement)

    # The bench takes the vit alone (the run has no cnn), its PyTorch row the imported student.
    small = ["--batch-sizes", "1", "--sizes", "64x96", "--seconds", "0.05", "--min-runs", "2", "--warmup", "0",
             "--eval-images", "1", "--backends", "torch", "ort.cpu.fp32", "--out", str(tmp_path / "bench")]  # fmt: skip
    assert bench([*small, "--run", str(run)]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["results"]
    assert [(r["model"], r["backend"], r["status"]) for r in rows] == [
        ("vit", "torch", "ok"),
        ("vit", "ort.cpu.fp32", "ok"),
    ]
    assert all(r["agreement"] >= 0.999 for r in rows)


@pytest.mark.parametrize("shape", [{"num_labels": 150}, {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3]}])
def test_other_sizes_and_class_counts_are_the_vit_exactly(tmp_path, shape):
    """ADE20K's 150 classes on B0, and a B2 (768 wide head): the run's student gives transformers' logits."""
    from export.imported import from_transformers

    names = [f"class {i}" for i in range(shape.pop("num_labels", 19))]
    width = 768 if "depths" in shape else 256
    config = transformers.SegformerConfig(num_labels=len(names), decoder_hidden_size=width, **shape)
    hf = transformers.SegformerForSemanticSegmentation(config).eval()
    hf.config.id2label = dict(enumerate(names))
    hf.save_pretrained(tmp_path / "hf")
    run = from_transformers(tmp_path / "hf", tmp_path / "run", count=2)
    cfg = load_run_config(run)
    assert cfg.vit.backbone == ("pvt_v2_b2" if "depths" in shape else "pvt_v2_b0") and cfg.data.class_names == names
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(load_student(run, "vit")(x).logits, hf(pixel_values=x).logits, atol=1e-4, rtol=0)


def _config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda f: _config(f, model_type="vit"), "config.json: model_type is 'vit', not 'segformer'"),
        (lambda f: _config(f, id2label=None), "config.json: no id2label"),
        (lambda f: _config(f, hidden_sizes=[32, 64, 160, 512]), "are those of no MiT (B0..B5)"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights file (model.safetensors or pytorch_model.bin)"),
        (lambda f: (f / "config.json").write_text("{"), "config.json: not readable as JSON"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_named_before_anything_is_written(tmp_path, capsys, damage, said):
    checkpoint(tmp_path / "hf", ["background", "thing"])
    damage(tmp_path / "hf")
    run = tmp_path / "runs" / "imported"
    assert main(["--from-transformers", str(tmp_path / "hf"), "--run", str(run)]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no half-written run dir
