"""The two compact students. Both return a `StudentOutput`; `build_student` makes one from its config."""

from __future__ import annotations

from torch import nn

from train.config import StudentConfig
from train.models.common import StudentOutput
from train.models.deeplabv3plus import DeepLabV3Plus
from train.models.segformer import SegFormer


def build_student(cfg: StudentConfig, num_classes: int) -> nn.Module:
    if cfg.arch == "deeplabv3plus":
        return DeepLabV3Plus(
            num_classes, cfg.backbone, cfg.output_stride or 8, cfg.pretrained, cfg.weights, cfg.decoder_channels
        )
    if cfg.arch == "segformer":
        return SegFormer(num_classes, cfg.backbone, cfg.pretrained, cfg.weights, cfg.decoder_channels)
    raise ValueError(f"unknown student arch '{cfg.arch}' (deeplabv3plus or segformer)")


__all__ = ["DeepLabV3Plus", "SegFormer", "StudentOutput", "build_student"]
