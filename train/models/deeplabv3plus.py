"""DeepLabV3+ (Chen et al., 2018) on a timm CNN encoder (ResNet-18 by default, MobileNetV2 option)."""

from __future__ import annotations

import torch
from torch import nn

from train.models.common import ConvBNReLU, StudentOutput, create_encoder, upsample_like


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, and image pooling, fused by 1x1."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, out_ch, 1)] + [ConvBNReLU(in_ch, out_ch, 3, dilation=r) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_ch, out_ch, 1))
        self.project = ConvBNReLU(out_ch * (len(rates) + 2), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    def __init__(
        self, low_ch: int, high_ch: int, num_classes: int, rates: tuple[int, int, int], dim: int = 256
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_ch, dim, rates)
        self.low_proj = ConvBNReLU(low_ch, 48, 1)
        self.fuse = nn.Sequential(ConvBNReLU(dim + 48, dim, 3), ConvBNReLU(dim, dim, 3))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(dim, num_classes, 1))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Resize to the low-level map's actual size (not a fixed x4), so any input size works.
        context = upsample_like(self.aspp(high), low)
        feat = self.fuse(torch.cat([context, self.low_proj(low)], dim=1))
        return feat, self.classifier(feat)


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        output_stride: int = 8,
        decoder_channels: int = 256,
        encoder_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.encoder = create_encoder(backbone, encoder_state, out_indices=(1, 2, 3, 4), output_stride=output_stride)
        channels = self.encoder.feature_info.channels()
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        self.decoder = DeepLabV3PlusHead(channels[0], channels[-1], num_classes, rates, decoder_channels)

    def forward(self, x: torch.Tensor) -> StudentOutput:
        stages = self.encoder(x)
        feat, logits = self.decoder(stages[0], stages[-1])
        return StudentOutput(stages, feat, logits)
