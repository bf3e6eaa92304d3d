"""Dataset-level segmentation metrics from one confusion matrix (the Cityscapes/VOC definition)."""

from __future__ import annotations

import torch

from train.data import IGNORE_INDEX


class ConfusionMatrix:
    """`mat[t, p]` counts pixels of true class t predicted as p, summed over a whole split.

    mIoU is the mean over classes that occur (in labels or predictions), like torchmetrics'
    `MulticlassJaccardIndex(average="macro", ignore_index=255)`.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        valid = target != IGNORE_INDEX
        k = self.num_classes
        idx = target[valid].to(torch.int64) * k + pred[valid].to(torch.int64)
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def compute(self) -> dict:
        mat = self.mat.double()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        iou = tp / union  # nan for classes absent from both labels and predictions
        total = mat.sum()
        return {
            "miou": iou.nanmean().item(),
            "iou": [None if torch.isnan(v) else v.item() for v in iou],
            "acc": (tp.sum() / total).item() if total > 0 else float("nan"),
        }
