"""One dataset class for every layout: a list of (image, mask) files plus the class table.

Each layout module (folder, cityscapes, camvid, voc) only finds the files; reading, label
mapping and validation live here, so every layout fails the same clear way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class ClassTable:
    names: list[str]
    palette: list[list[int]]  # RGB per class

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise DatasetError(f"{len(self.names)} class names but {len(self.palette)} palette colours")

    @property
    def num_classes(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file is empty: {path}")
    return ids


def open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def size_mismatch(mask: Path, mask_wh: tuple[int, int], image_wh: tuple[int, int]) -> str:
    return f"mask size {mask_wh[0]}x{mask_wh[1]} differs from its image {image_wh[0]}x{image_wh[1]}: {mask}"


def read_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB."""
    try:
        with open_image(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as e:  # truncated or corrupt data surfaces only on decode
        raise DatasetError(f"cannot read {path}: {e}") from None


def read_mask(path: Path, label_map: np.ndarray | None, num_classes: int) -> np.ndarray:
    """HxW uint8 class indices (255 = ignore) from a single-channel mask, mapped through the layout's
    `label_map`; values outside 0..num_classes-1 fail, naming the file."""
    try:
        with open_image(path) as m:
            if m.mode not in ("L", "P"):
                raise DatasetError(f"mask must be single-channel 8-bit (mode L or P), got {m.mode}: {path}")
            mask = np.asarray(m)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from None
    if label_map is not None:
        mask = label_map[mask]
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = sorted(set(np.unique(mask[bad]).tolist()))
        raise DatasetError(f"label values {values} outside 0..{num_classes - 1} (255 = ignore): {path}")
    return mask


class SegmentationDataset(torch.utils.data.Dataset):
    """Pairs of image and mask files; `dataset[i]` or `dataset[(i, seed)]` -> (image, mask) tensors.

    The (index, seed) form lets a sampler fix the augmentation of every sample, which makes
    training exactly resumable whatever the worker count.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: ClassTable,
        transform: Callable | None = None,
        label_map: np.ndarray | None = None,
        name: str = "dataset",
    ) -> None:
        if not samples:
            raise DatasetError(f"{name}: no samples found")
        self.samples = list(samples)
        self.classes = classes
        self.transform = transform
        self.label_map = label_map  # uint8 lookup table of 256 entries: raw mask value -> class index
        self.name = name
        self._check_pairs()

    def _check_pairs(self) -> None:
        """Cheap checks from file headers: every image has a mask of the same size."""
        for s in self.samples:
            if not s.image.is_file():
                raise DatasetError(f"image not found: {s.image}")
            if not s.mask.is_file():
                raise DatasetError(f"image without mask: {s.image} (expected {s.mask})")
            with open_image(s.image) as img, open_image(s.mask) as mask:
                if img.size != mask.size:
                    raise DatasetError(size_mismatch(s.mask, mask.size, img.size))

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: list[int]) -> SegmentationDataset:
        """The same dataset over some of its samples (checked already)."""
        other = copy.copy(self)
        other.samples = [self.samples[i] for i in indices]
        return other

    def read_mask(self, index: int) -> np.ndarray:
        """HxW uint8 class indices (255 = ignore), validated against the class table."""
        return read_mask(self.samples[index].mask, self.label_map, self.classes.num_classes)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_image(self.samples[index].image), self.read_mask(index)

    def verify(self) -> None:
        """Read every mask once (and decode every image) so bad data fails before training."""
        for i in range(len(self)):
            self.read(i)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.read(index)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask, np.random.default_rng(seed))


def lookup_table(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    lut = np.full(256, default, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut
