"""The overlay grid shows each model's real class maps over the images, beside the labels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.overlays import blend, main
from serve.segmenter import MODELS, load_segmenter
from train.data import build_dataset
from train.run_dir import load_run_config


def test_the_grid_holds_each_image_its_labels_and_every_models_class_map(exported_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["--run", str(exported_run), "--images", "2", "--scale", "2", "--out", str(out)]) == 0
    cfg = load_run_config(exported_run)
    dataset = build_dataset(cfg.data, cfg.data.test_split, train=False)
    palette = np.array(cfg.data.palette, np.uint8)
    grid = np.asarray(Image.open(out).convert("RGB"))
    image, labels = dataset.read(1)
    h, w = labels.shape
    row = grid[16 + 2 * h : 16 + 4 * h : 2, ::2]  # the second image's row, one pixel per image pixel
    cells = [row[:, c * w : (c + 1) * w] for c in range(2 + len(MODELS))]
    assert grid.shape == (16 + 2 * 2 * h, 2 * w * (2 + len(MODELS)), 3)
    assert np.array_equal(cells[0], image) and np.array_equal(cells[1], blend(image, labels, palette))
    for model, cell in zip(MODELS, cells[2:], strict=True):
        predicted = load_segmenter(exported_run / "export", model, "ort.cpu.fp32").predict(image).labels
        assert np.array_equal(cell, blend(image, predicted, palette)), model


def test_a_run_without_engines_is_refused_in_one_line(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2 and "not a run dir" in capsys.readouterr().err
