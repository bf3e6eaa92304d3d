"""What both students share: the output type, conv blocks, and the timm encoder factory."""

from __future__ import annotations

import hashlib
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


def create_encoder(name: str, state: dict[str, torch.Tensor] | None = None, **kwargs) -> nn.Module:
    """A timm `features_only` encoder, randomly initialised or loaded from `state` (timm's key names,
    from train.models.pretrained) through timm's own loader."""
    if state is None:
        return timm.create_model(name, features_only=True, **kwargs)
    overlay = {"state_dict": state}
    encoder = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    _check_loaded(encoder, name, state)
    return encoder


def _fingerprint(t: torch.Tensor) -> tuple:
    return tuple(t.shape), hashlib.sha1(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _check_loaded(encoder: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """timm loads into a features_only encoder non-strictly (the classifier is dropped), so a state for
    another model would silently leave random weights. Every encoder parameter must come from the state
    (compared by value: the feature wrapper renames modules)."""
    given = {_fingerprint(t) for t in state.values()}
    params = dict(encoder.named_parameters())
    if missing := [k for k, v in params.items() if _fingerprint(v) not in given]:
        raise ValueError(
            f"the weights given for timm model '{name}' left {len(missing)} of {len(params)} encoder tensors "
            f"unloaded, e.g. {', '.join(missing[:3])}"
        )


def upsample_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return nn.functional.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
