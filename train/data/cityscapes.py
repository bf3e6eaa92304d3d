"""Cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_*.png.

Uses *_gtFine_labelTrainIds.png when every image has one (cityscapesScripts output),
otherwise maps *_gtFine_labelIds.png to the 19 train ids on the fly.
"""

from __future__ import annotations

from pathlib import Path

from train.data.dataset import ClassTable, DatasetError, Sample, lookup_table, require_dir

CLASSES = ClassTable(
    names=[
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ],  # fmt: skip
    palette=[
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
        [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
        [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
        [0, 80, 100], [0, 0, 230], [119, 11, 32],
    ],  # fmt: skip
)
# labelIds of the 19 evaluated classes, in train-id order; every other id is ignored.
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
LABEL_ID_TO_TRAIN_ID = lookup_table({label_id: i for i, label_id in enumerate(LABEL_IDS)})


def cityscapes_dataset(root: Path, split: str):
    root = Path(root)
    images_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes split")
    labels_dir = require_dir(root / "gtFine" / split, "Cityscapes labels")
    images = sorted(images_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(f"no *_leftImg8bit.png images under {images_dir}")

    def mask_path(image: Path, kind: str) -> Path:
        stem = image.name.removesuffix("_leftImg8bit.png")
        return labels_dir / image.parent.name / f"{stem}_gtFine_{kind}.png"

    if all(mask_path(p, "labelTrainIds").is_file() for p in images):
        return [Sample(p, mask_path(p, "labelTrainIds")) for p in images], CLASSES, None
    return [Sample(p, mask_path(p, "labelIds")) for p in images], CLASSES, LABEL_ID_TO_TRAIN_ID
