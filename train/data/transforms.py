"""Paired image/mask transforms (numpy + PIL), and batch collation with ignore padding."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

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


def fit_scale(h: int, w: int, scale: tuple[int, int]) -> float:
    """The factor that rescales an h x w image to fit `scale` = (long, short), keeping its aspect ratio
    (mmseg's `Resize(keep_ratio=True)`)."""
    long, short = max(scale), min(scale)
    return min(long / max(h, w), short / min(h, w))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion with its defaults, each step with probability 0.5: brightness
    +-32, contrast x0.5-1.5 (before or after the colour steps), saturation x0.5-1.5, hue +-18 degrees
    of 180. Not torchvision's ColorJitter: its brightness and contrast are other operations (a factor,
    a blend with the mean), and it draws from torch's global RNG, while every draw here comes from the
    sample's own generator, which keeps a resumed run on the very same batches."""
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast is not None and contrast_first:
        x = x * contrast
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else None
    if saturation is not None or hue is not None:
        hsv = np.asarray(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).convert("HSV")).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        if hue is not None:  # PIL's hue runs 0-255 for the full circle
            hsv[..., 0] = (hsv[..., 0] + hue * 256 / 180) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if contrast is not None and not contrast_first:
        x = x * contrast
    return np.clip(x, 0, 255).astype(np.uint8)


def strong_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A learner's strong view of an unlabelled crop, in colour only so that its pixels stay aligned with the
    teacher's weak view (FixMatch / UniMatch's recipe): colour jitter (p 0.8: brightness, contrast and
    saturation x0.5-1.5, hue +-0.25 turn), greyscale (p 0.2), Gaussian blur (p 0.5, sigma 0.1-2 px)."""
    img = Image.fromarray(image)
    if rng.random() < 0.8:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.5, 1.5))
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.uniform(-0.25, 0.25) * 256)) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 2.0)))
    return np.asarray(img)


class TrainTransform:
    """Random scale, random crop (padding the mask with ignore), horizontal flip, optional photometric
    distortion, ImageNet normalisation: mmseg's training pipeline.

    base_size (long, short): the random ratio applies to the image rescaled to fit it (mmseg's
    RandomResize scale), else to the image itself. cat_max_ratio < 1: up to 10 crops are drawn until no
    class covers more than that share of the crop's labelled pixels (mmseg's RandomCrop)."""

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        base_size: tuple[int, int] | None = None,
        cat_max_ratio: float = 1.0,
        photometric: bool = False,
    ) -> None:
        self.crop_h, self.crop_w = crop_size
        self.scale_range, self.base_size = scale_range, base_size
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric

    def _crop_origin(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
        for _ in range(10 if self.cat_max_ratio < 1 else 1):
            top = int(rng.integers(0, mask.shape[0] - self.crop_h + 1))
            left = int(rng.integers(0, mask.shape[1] - self.crop_w + 1))
            if self.cat_max_ratio >= 1:
                break
            crop = mask[top : top + self.crop_h, left : left + self.crop_w]
            counts = np.bincount(crop[crop != IGNORE_INDEX].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return top, left

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        return to_tensors(*self.crop(image, mask, rng))

    def crop(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The augmented uint8 image and its mask, before normalisation."""
        scale = rng.uniform(*self.scale_range)
        h, w = mask.shape
        if self.base_size is not None:
            scale *= fit_scale(h, w, self.base_size)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))

        h, w = mask.shape
        ph, pw = max(self.crop_h - h, 0), max(self.crop_w - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        top, left = self._crop_origin(mask, rng)
        image = image[top : top + self.crop_h, left : left + self.crop_w]
        mask = mask[top : top + self.crop_h, left : left + self.crop_w]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        return image, mask


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
