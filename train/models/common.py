"""What both students share: the output type, conv blocks, and the timm encoder factory."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import timm
import torch
from torch import nn


class StudentOutput(NamedTuple):
    """low: encoder stage features (stage 1 = stride 4 first); feat: decoder feature at stride 4
    (B x 256 x H/4 x W/4); logits: B x K x H/4 x W/4. Upsampling to H x W happens in the loss."""

    low: list[torch.Tensor]
    feat: torch.Tensor
    logits: torch.Tensor


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def create_encoder(name: str, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm `features_only` encoder. `weights` is a local file (.safetensors or .pth, loaded through
    timm's own key filter, weights_only), used instead of the model hub."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder weights not found: {weights}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained or weights is not None, **kwargs)
    except RuntimeError as e:
        if weights is not None:
            raise ValueError(f"encoder weights {weights} do not fit timm model '{name}': {e}") from None
        raise


def upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return nn.functional.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
