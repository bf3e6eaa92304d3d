"""The two compact students. Both return a `StudentOutput`; `build_student` makes one from its config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from train.config import StudentConfig
from train.models.common import StudentOutput
from train.models.deeplabv3plus import DeepLabV3Plus
from train.models.pretrained import WeightsError, load_decode_head, locate, read_encoder_state, read_weights
from train.models.segformer import SegFormer

# arch (train.config.STUDENTS) -> how its model is built from a student config, a class count, encoder weights
ARCHITECTURES = {
    "deeplabv3plus": lambda cfg, k, state: DeepLabV3Plus(
        k, cfg.backbone, cfg.output_stride or 8, cfg.decoder_channels, state
    ),
    "segformer": lambda cfg, k, state: SegFormer(k, cfg.backbone, cfg.decoder_channels, state, cfg.norm_eps),
}


def build_student(cfg: StudentConfig, num_classes: int, init: str | Path | None = None) -> nn.Module:
    """`init`: a file or folder of encoder weights (`train.models.pretrained.locate(cfg)` finds the config's),
    and of a SegFormer's decode head where it holds one (transformers' SegformerForSemanticSegmentation);
    None builds the architecture only (random initialisation, or before loading a run's own weights)."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown student arch '{cfg.arch}' ({', '.join(ARCHITECTURES)})")
    if init is None:
        return ARCHITECTURES[cfg.arch](cfg, num_classes, None)
    file, state = read_weights(Path(init))
    model = ARCHITECTURES[cfg.arch](cfg, num_classes, read_encoder_state(file, state, cfg))
    if cfg.arch == "segformer":
        load_decode_head(model, file, state, cfg.decoder_channels)
    return model


__all__ = ["DeepLabV3Plus", "SegFormer", "StudentOutput", "WeightsError", "build_student", "locate"]
