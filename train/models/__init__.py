"""The two compact students. Both return a `StudentOutput`; `build_student` makes one from its config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from train.config import StudentConfig
from train.models.common import StudentOutput
from train.models.deeplabv3plus import DeepLabV3Plus
from train.models.pretrained import WeightsError, locate, read_encoder_state
from train.models.segformer import SegFormer


def build_student(cfg: StudentConfig, num_classes: int, init: str | Path | None = None) -> nn.Module:
    """`init`: a file or folder of encoder weights (`train.models.pretrained.locate(cfg)` finds the config's);
    None builds the architecture only (random initialisation, or before loading a run's own weights)."""
    state = read_encoder_state(Path(init), cfg) if init is not None else None
    if cfg.arch == "deeplabv3plus":
        return DeepLabV3Plus(num_classes, cfg.backbone, cfg.output_stride or 8, cfg.decoder_channels, state)
    if cfg.arch == "segformer":
        return SegFormer(num_classes, cfg.backbone, cfg.decoder_channels, state)
    raise ValueError(f"unknown student arch '{cfg.arch}' (deeplabv3plus or segformer)")


__all__ = ["DeepLabV3Plus", "SegFormer", "StudentOutput", "WeightsError", "build_student", "locate"]
