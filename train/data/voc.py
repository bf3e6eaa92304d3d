"""PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNGs read as indices),
ImageSets/Segmentation/<split>.txt; the SBD-augmented `train_aug` split reads
SegmentationClassAug/ with ImageSets/Segmentation/train_aug.txt."""

from __future__ import annotations

from pathlib import Path

from train.data.dataset import ClassTable, DatasetError, Sample, read_split_file, require_dir


def _voc_palette(n: int) -> list[list[int]]:
    """The standard VOC colour map: class index bits spread over the RGB high bits."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


CLASSES = ClassTable(
    names=[
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
        "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
        "train", "tvmonitor",
    ],  # fmt: skip
    palette=_voc_palette(21),
)


def voc_dataset(root: Path, split: str):
    root = require_dir(Path(root), "VOC root")
    if (root / "VOC2012").is_dir():  # accept VOCdevkit/ as well as VOCdevkit/VOC2012/
        root = root / "VOC2012"
    images_dir = require_dir(root / "JPEGImages", "VOC images")
    aug = split == "train_aug"
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    masks_dir = root / ("SegmentationClassAug" if aug else "SegmentationClass")
    if aug and not (split_file.is_file() and masks_dir.is_dir()):
        raise DatasetError(
            f"{split_file} or {masks_dir} not found: train_aug needs SBD "
            "(SegmentationClassAug/ + train_aug.txt); or use data.train_split=train"
        )
    require_dir(masks_dir, "VOC masks")
    ids = read_split_file(split_file)
    if missing := [i for i in ids if not (images_dir / f"{i}.jpg").is_file()]:
        raise DatasetError(f"image not found: {images_dir / (missing[0] + '.jpg')} (listed in {split_file})")
    return [Sample(images_dir / f"{i}.jpg", masks_dir / f"{i}.png") for i in ids], CLASSES, None
