"""Generic folder format, the layout users bring their own data in.

    <root>/images/<id>.png|jpg     RGB images
    <root>/masks/<id>.png          single-channel uint8 class indices, 255 = ignore
    <root>/splits/<split>.txt      one id per line
    <root>/classes.json            {"names": [...], "palette": [[r, g, b], ...]}
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data.dataset import ClassTable, DatasetError, Sample, read_split_file, require_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_classes(path: Path) -> ClassTable:
    if not path.is_file():
        raise DatasetError(f"class table not found: {path}")
    try:
        data = json.loads(path.read_text())
        names, palette = data["names"], data["palette"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f'{path}: expected {{"names": [...], "palette": [[r, g, b], ...]}} ({e})') from None
    if not all(isinstance(c, list) and len(c) == 3 for c in palette):
        raise DatasetError(f"{path}: every palette entry must be [r, g, b]")
    try:
        return ClassTable(list(names), [list(map(int, c)) for c in palette])
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None


def folder_dataset(root: Path, split: str) -> tuple[list[Sample], ClassTable, None]:
    root = require_dir(Path(root), "dataset root")
    classes = read_classes(root / "classes.json")
    images_dir = require_dir(root / "images", "image folder")
    masks_dir = require_dir(root / "masks", "mask folder")
    split_file = root / "splits" / f"{split}.txt"
    samples = []
    for sample_id in read_split_file(split_file):
        image = next((p for s in IMAGE_SUFFIXES if (p := images_dir / f"{sample_id}{s}").is_file()), None)
        if image is None:
            raise DatasetError(f"no image for id '{sample_id}' listed in {split_file} (looked in {images_dir})")
        samples.append(Sample(image, masks_dir / f"{sample_id}.png"))
    return samples, classes, None
