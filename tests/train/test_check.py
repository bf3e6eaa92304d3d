"""`python -m train.data.check` on real trees: a clean one, one with broken files, a wrong layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.train.test_data import make_folder, save_png
from train.data.check import main

CONFIG = str(REPO / "configs/synthetic.yaml")


def tree(root, broken: bool):
    masks = {f"m{i}": np.array([[0, 1], [1, 255]] if i else [[0, 0], [0, 0]], np.uint8) for i in range(5)}
    make_folder(root, masks)
    (root / "splits" / "val.txt").write_text("m0\nm1\n")
    if broken:
        data = (root / "masks" / "m1.png").read_bytes()
        (root / "masks" / "m1.png").write_bytes(data[: len(data) // 2])  # truncated
        save_png(root / "masks" / "m2.png", np.zeros((3, 2), np.uint8))  # other size than its image
        save_png(root / "masks" / "m3.png", np.array([[0, 7], [1, 1]], np.uint8))  # a label outside 2 classes
        (root / "masks" / "m4.png").unlink()
    return root


def check(root, capsys, *extra):
    code = main(["--config", CONFIG, f"data.root={root}", "data.test_split=null", "--workers", "2", *extra])
    return code, *capsys.readouterr()


def test_clean_tree_reports_counts_and_class_shares(tmp_path, capsys):
    code, out, _ = check(tree(tmp_path, broken=False), capsys)
    assert code == 0 and "no problems" in out
    assert "| train | 5 | 5 | 0 |" in out and "| val | 2 | 2 | 0 |" in out
    # train: bg 4 + 4 x 1 = 8 pixels, fg 4 x 2 = 8; bg in all 5 images, fg in 4. val (m0, m1): bg 5, fg 2
    assert "| bg | 50.00 | 5 | 71.43 | 2 |" in out and "| fg | 50.00 | 4 | 28.57 | 1 |" in out
    assert "train: 20.0 % of pixels ignored" in out


def test_broken_tree_names_every_bad_file_and_exits_1(tmp_path, capsys):
    root = tree(tmp_path, broken=True)
    code, out, err = check(root, capsys)
    assert code == 1
    masks = root / "masks"
    assert f"cannot read {masks / 'm1.png'}" in err
    assert f"mask size 2x3 differs from its image 2x2: {masks / 'm2.png'}" in err
    assert f"label values [7] outside 0..1 (255 = ignore): {masks / 'm3.png'}" in err
    assert f"image without mask: {root / 'images' / 'm4.png'}" in err
    assert "| train | 5 | 4 | 4 |" in out and "| val | 2 | 2 | 1 |" in out  # m1 is in both splits


def test_unreadable_image_is_named(tmp_path, capsys):
    root = tree(tmp_path, broken=False)
    (root / "images" / "m2.png").write_bytes(b"not a png")
    code, _, err = check(root, capsys)
    assert code == 1 and f"cannot read {root / 'images' / 'm2.png'}" in err


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("folder", "class table not found"), ("cityscapes", "Cityscapes split not found"), ("ade20k", "ADE20K images")],
)
def test_wrong_layout_says_which_folder_was_expected(tmp_path, capsys, fmt, expected):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "photo.png")
    code, _, err = check(tmp_path, capsys, f"data.format={fmt}")
    assert code == 2 and expected in err and str(tmp_path) in err
