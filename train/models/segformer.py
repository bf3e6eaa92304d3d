"""SegFormer (Xie et al., 2021): a MiT encoder with the All-MLP decoder.

timm's `pvt_v2_b0` with `mlp_ratios=(4, 4, 4, 4)` is MiT-B0 (same depths, widths, heads,
reduction ratios, overlapping patch embeddings, conv FFN) and loads MiT-B0 weights (NVlabs or
transformers naming, train.models.pretrained); likewise pvt_v2_b1..b5 for MiT-B1..B5.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from train.models.common import ConvBNReLU, StudentOutput, create_encoder, upsample_like


def encoder_args(backbone: str, norm_eps: float | None = None) -> dict:
    """timm arguments that make `backbone` the MiT of that size (pvt_v2_bN -> MiT-BN), its blocks' and
    stages' LayerNorms with `norm_eps` where given."""
    if not backbone.startswith("pvt_v2"):
        return {}
    from timm.layers import LayerNorm

    return {"mlp_ratios": (4, 4, 4, 4)} | ({"norm_layer": partial(LayerNorm, eps=norm_eps)} if norm_eps else {})


class AllMLPHead(nn.Module):
    """Each stage linearly projected to `dim`, upsampled to stride 4, concatenated, fused by a 1x1 conv."""

    def __init__(self, in_channels: list[int], num_classes: int, dim: int = 256) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in in_channels])
        self.fuse = ConvBNReLU(dim * len(in_channels), dim, 1)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(dim, num_classes, 1))

    def forward(self, stages: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        first = stages[0]
        projected = [
            upsample_like(p(s), first) if i else p(s) for i, (p, s) in enumerate(zip(self.proj, stages, strict=True))
        ]
        feat = self.fuse(torch.cat(projected, dim=1))
        return feat, self.classifier(feat)


class SegFormer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "pvt_v2_b0",
        decoder_channels: int = 256,
        encoder_state: dict[str, torch.Tensor] | None = None,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder = create_encoder(backbone, encoder_state, **encoder_args(backbone, norm_eps))
        self.decoder = AllMLPHead(self.encoder.feature_info.channels(), num_classes, decoder_channels)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        stages = self.encoder(x)
        feat, logits = self.decoder(stages)
        return StudentOutput(stages, feat, logits)
