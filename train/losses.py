"""Loss terms over two `StudentOutput`s. Every pixel term is averaged over valid (non-ignore) pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.data import IGNORE_INDEX
from train.models import StudentOutput


def upsample_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits at label resolution, in fp32 (losses and metrics never downsample labels)."""
    return F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled pixels; 0 (with a graph) when a batch has none."""
    per_pixel = F.cross_entropy(upsample_logits(logits, labels), labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).sum()
    return per_pixel.sum() / valid.clamp(min=1)


class Objective:
    """The training objective as named terms; the trainer back-propagates their sum.

    `progress` (0 -> 1 over training) is there for terms with a warm-up.
    """

    def __call__(
        self, cnn: StudentOutput, vit: StudentOutput, labels: torch.Tensor, progress: float
    ) -> dict[str, torch.Tensor]:
        return {"ce_cnn": cross_entropy(cnn.logits, labels), "ce_vit": cross_entropy(vit.logits, labels)}
