"""Dataset-level segmentation metrics from one confusion matrix (the Cityscapes/VOC definition)."""

from __future__ import annotations

import torch

from train.data import IGNORE_INDEX


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """The class of each pixel (argmax over dim 1, the first of ties). `max(1).indices`: torch's CPU `argmax`
    over a dim that is not the last is 15-25x slower (torch 2.14: 107 ms against 4 ms for 5x512x1024)."""
    return logits.max(1).indices


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


class Complementarity:
    """How two students' errors differ over a split (the method's benchmark gate, docs/method.md):

    - `one_right`: share of labelled pixels that exactly one student gets right;
    - `shared_errors`: share of the pixels either student gets wrong that both get wrong;
    - an oracle that takes, per pixel, the prediction of a student that is right, and where neither is,
      the better student's (so that its gain over the better student is all the two could teach each other).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)  # labelled, one right, both wrong
        self.oracle = [ConfusionMatrix(num_classes, device) for _ in range(2)]  # falling back on a / on b

    def update(self, pred_a: torch.Tensor, pred_b: torch.Tensor, target: torch.Tensor) -> None:
        labelled = target != IGNORE_INDEX
        right_a, right_b = (pred_a == target) & labelled, (pred_b == target) & labelled
        self.counts += torch.stack(
            [labelled.sum(), (right_a ^ right_b).sum(), (labelled & ~right_a & ~right_b).sum()]
        ).to(self.counts)
        either = torch.where(right_a, pred_a, pred_b)  # a student that is right, where one is
        self.oracle[0].update(torch.where(right_a | right_b, either, pred_a), target)
        self.oracle[1].update(torch.where(right_a | right_b, either, pred_b), target)

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.counts)
        for matrix in self.oracle:
            matrix.all_reduce()

    def compute(self, a_is_better: bool) -> dict:
        """The oracle's metrics (with the better student's fallback) and the two shares."""
        labelled, one_right, both_wrong = self.counts.tolist()
        any_wrong = one_right + both_wrong
        return {
            **self.oracle[0 if a_is_better else 1].compute(),
            "one_right": one_right / labelled if labelled else float("nan"),
            "shared_errors": both_wrong / any_wrong if any_wrong else float("nan"),
        }
