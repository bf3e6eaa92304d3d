"""Few labels, many images: the labelled subset of a train split and the unlabelled images beside it.

`data.labeled` keeps the masks of a subset of the train split (a count, a share, or a file of names), drawn
by `data.labeled_seed` alone: every arm and every seed of a comparison sees the same labelled images, and a
smaller count's subset lies inside a larger one's. The rest of the split, and every image of the
`data.unlabeled` folder, are the unlabelled pool: images cropped as the labelled ones are, with a mask of
where the crop holds image rather than padding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.config import ConfigError, DataConfig
from train.data.dataset import IGNORE_INDEX, DatasetError, SegmentationDataset, open_image, read_image
from train.data.folder import IMAGE_SUFFIXES
from train.data.transforms import TrainTransform, fit_scale, normalise, strong_augment

LABELED_FILE = "labeled.txt"  # in the run dir: the labelled images, relative to data.root, one per line


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def labeled_subset(split: SegmentationDataset, cfg: DataConfig, recorded: Path | None = None) -> list[int]:
    """Indices of the split's samples whose masks are kept, in the split's order; `recorded`: a run's own
    record of them (`LABELED_FILE`), which a resumed run keeps to."""
    n, spec, root = len(split), cfg.labeled, Path(cfg.root)
    if recorded is not None:
        return _named_subset(split, recorded, root)
    if spec is None:
        return list(range(n))
    if isinstance(spec, str):
        return _named_subset(split, root / spec if not Path(spec).is_absolute() else Path(spec), root)
    count = spec if isinstance(spec, int) else max(1, round(spec * n))
    if count > n:
        raise ConfigError(f"data.labeled={spec}: the train split {split.name} has only {n} images")
    return sorted(np.random.default_rng(cfg.labeled_seed).permutation(n)[:count].tolist())


def _named_subset(split: SegmentationDataset, path: Path, root: Path) -> list[int]:
    """A file of image names (relative to data.root, or ids: file names without their suffix)."""
    if not path.is_file():
        raise ConfigError(f"data.labeled: no such file {path}")
    index = {}
    for i, s in enumerate(split.samples):
        index[_name(s.image, root)] = index[s.image.stem] = i
    chosen = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if name := line.strip():
            if name not in index:
                raise ConfigError(f"{path}, line {number}: {name!r} is not an image of {split.name}")
            chosen.add(index[name])
    if not chosen:
        raise ConfigError(f"data.labeled: {path} names no image")
    return sorted(chosen)


def write_labeled(split: SegmentationDataset, indices: list[int], root: str, run_dir: Path) -> None:
    names = [_name(split.samples[i].image, Path(root)) for i in indices]
    (run_dir / LABELED_FILE).write_text("".join(f"{n}\n" for n in names))


def folder_images(folder: Path) -> list[Path]:
    """Every image under `folder` (any depth), sorted: Cityscapes' leftImg8bit/train_extra holds a folder per city."""
    if not folder.is_dir():
        raise DatasetError(f"unlabelled image folder not found: {folder} (data.unlabeled)")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} (data.unlabeled)")
    return images


def image_problem(path: Path, cfg: DataConfig, decode: bool = False) -> str | None:
    """Why an unlabelled file cannot be trained on, or None: unreadable, a mask rather than an image (one
    channel holding only class indices and 255), or smaller than the crop (after `data.base_size`)."""
    try:
        with open_image(path) as img:
            size, mode = img.size, img.mode
            pixels = np.asarray(img) if mode in ("L", "P") or decode else None
    except (DatasetError, OSError) as e:
        return f"cannot read {path}: {e}"
    if pixels is not None and mode in ("L", "P"):
        classes = cfg.num_classes or 256
        if ((pixels < classes) | (pixels == IGNORE_INDEX)).all():
            return f"a mask, not an image (one channel of class indices, mode {mode}): {path}"
    w, h = size
    scale = fit_scale(h, w, tuple(cfg.base_size)) if cfg.base_size else 1.0
    crop_h, crop_w = cfg.crop_size
    if h * scale < crop_h or w * scale < crop_w:
        fitted = f" ({round(w * scale)}x{round(h * scale)} fitted to data.base_size)" if cfg.base_size else ""
        return f"image {w}x{h}{fitted} is smaller than the crop {crop_w}x{crop_h} (data.crop_size): {path}"
    return None


class UnlabeledDataset(torch.utils.data.Dataset):
    """Images without masks; `dataset[(i, seed)]` -> (weak view, [strong view,] image-pixel mask), cropped
    by the labelled split's transform from the sample's own generator, so that a resumed run sees the
    very same crops. The strong view is the weak one recoloured (`strong_augment`): their pixels align."""

    def __init__(self, images: list[Path], transform: TrainTransform, strong: bool, name: str) -> None:
        if not images:
            raise DatasetError(f"{name}: no unlabelled images")
        self.images, self.transform, self.strong, self.name = images, transform, strong, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, tuple]) -> tuple[torch.Tensor, ...]:
        index, seed = key
        rng = np.random.default_rng(seed)
        image = read_image(self.images[index])
        weak, pad = self.transform.crop(image, np.zeros(image.shape[:2], np.uint8), rng)
        views = [weak, strong_augment(weak, rng)] if self.strong else [weak]
        tensors = [torch.from_numpy(normalise(v).transpose(2, 0, 1).copy()) for v in views]
        return *tensors, torch.from_numpy(pad != IGNORE_INDEX)


def unlabeled_images(split: SegmentationDataset, labeled: list[int], cfg: DataConfig) -> list[Path]:
    """The unlabelled pool: the split's images without kept masks, then the `data.unlabeled` folder's,
    each of the folder's files checked (headers; single-channel files decoded) before training starts."""
    kept = set(labeled)
    pool = [s.image for i, s in enumerate(split.samples) if i not in kept]
    if cfg.unlabeled is not None:
        folder = Path(cfg.root) / cfg.unlabeled
        extra = folder_images(folder)
        if problems := [p for path in extra if (p := image_problem(path, cfg))]:
            more = f" (and {len(problems) - 1} more: make check-data lists them)" if len(problems) > 1 else ""
            raise DatasetError(f"data.unlabeled: {problems[0]}{more}")
        pool += extra
    return pool

