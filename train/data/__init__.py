"""Datasets: the generic folder format, Cityscapes, CamVid, PASCAL VOC, ADE20K, and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

from train.config import DataConfig
from train.data.ade20k import ade20k_dataset
from train.data.camvid import camvid_dataset
from train.data.cityscapes import cityscapes_dataset
from train.data.dataset import IGNORE_INDEX, ClassTable, DatasetError, SegmentationDataset
from train.data.folder import folder_dataset
from train.data.transforms import EvalTransform, TrainTransform, pad_collate
from train.data.voc import voc_dataset

LAYOUTS = {
    "folder": folder_dataset,
    "cityscapes": cityscapes_dataset,
    "camvid": camvid_dataset,
    "voc": voc_dataset,
    "ade20k": ade20k_dataset,
}


def build_dataset(cfg: DataConfig, split: str, train: bool) -> SegmentationDataset:
    samples, classes, label_map = LAYOUTS[cfg.format](Path(cfg.root), split)
    if train:
        base = tuple(cfg.base_size) if cfg.base_size else None
        transform = TrainTransform(
            tuple(cfg.crop_size), tuple(cfg.scale_range), base, cfg.cat_max_ratio, cfg.photometric
        )
    else:
        transform = EvalTransform()
    return SegmentationDataset(samples, classes, transform, label_map, name=f"{cfg.root}:{split}")


__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "ClassTable",
    "DatasetError",
    "SegmentationDataset",
    "build_dataset",
    "pad_collate",
]
