"""Paired image/mask transforms (numpy + PIL), and batch collation with ignore padding."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from train.data.dataset import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_INV_STD = 1.0 / (np.array(IMAGENET_STD, dtype=np.float32) * 255)


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB with channels last (HxWx3 or NxHxWx3) -> float32 (x - 255 mean) / (255 std), same layout.
    The one normalisation of the project: training, evaluation, calibration and the parity gate."""
    return (pixels.astype(np.float32) - _MEAN) * _INV_STD


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HxWx3 + HxW -> normalised float 3xHxW + int64 HxW."""
    x = normalise(image)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(mask.astype(np.int64))


class TrainTransform:
    """Random scale, random crop (padding the mask with ignore), horizontal flip, ImageNet normalisation."""

    def __init__(self, crop_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        self.crop_h, self.crop_w = crop_size
        self.scale_range = scale_range

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        scale = rng.uniform(*self.scale_range)
        h, w = mask.shape
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))

        h, w = mask.shape
        ph, pw = max(self.crop_h - h, 0), max(self.crop_w - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        top = rng.integers(0, mask.shape[0] - self.crop_h + 1)
        left = rng.integers(0, mask.shape[1] - self.crop_w + 1)
        image = image[top : top + self.crop_h, left : left + self.crop_w]
        mask = mask[top : top + self.crop_h, left : left + self.crop_w]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return to_tensors(image, mask)


class EvalTransform:
    """Full resolution, normalisation only."""

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None):
        return to_tensors(image, mask)


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images of different sizes: pad images with 0 and masks with ignore at bottom/right."""
    h = max(img.shape[1] for img, _ in batch)
    w = max(img.shape[2] for img, _ in batch)
    images = torch.zeros(len(batch), 3, h, w)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.int64)
    for i, (img, mask) in enumerate(batch):
        images[i, :, : img.shape[1], : img.shape[2]] = img
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks
