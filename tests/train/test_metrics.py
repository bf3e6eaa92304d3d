from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from train.metrics import Complementarity, ConfusionMatrix, class_map


def test_confusion_matrix_against_hand_computed_values():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert cm.mat.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    r = cm.compute()
    assert r["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert r["iou"][3] is None  # absent everywhere: left out of the mean
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["acc"] == pytest.approx(4 / 6)


def test_dataset_level_not_image_average():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1]))  # image 1
    cm.update(torch.tensor([1]), torch.tensor([1]))  # image 2
    # summed matrix: class 0 tp 3 fn 0 fp 1 -> 3/4; class 1 tp 1 fn 1 -> 1/2
    assert cm.compute()["miou"] == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_matches_torchmetrics_jaccard():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (3, 17, 23), generator=g)
    target[target == 5] = 255
    pred = torch.randint(0, 5, (3, 17, 23), generator=g)
    cm = ConfusionMatrix(5)
    for p, t in zip(pred, target, strict=True):
        cm.update(p, t)
    ref = MulticlassJaccardIndex(num_classes=5, average="macro", ignore_index=255)
    assert cm.compute()["miou"] == pytest.approx(ref(pred, target).item(), abs=1e-6)


def test_empty_matrix_has_nan_accuracy():
    assert math.isnan(ConfusionMatrix(3).compute()["acc"])


def test_complementarity_on_hand_built_predictions():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 255]])
    a = torch.tensor([[0, 1, 1, 0, 0, 2, 0]])  # right at 0, 2, 5
    b = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])  # right at 0, 1, 3; both wrong at 4; pixel 6 unlabelled
    pair = Complementarity(3)
    pair.update(a, b, labels)
    on_a, on_b = pair.compute(a_is_better=True), pair.compute(a_is_better=False)
    assert on_a["one_right"] == pytest.approx(4 / 6)  # pixels 1, 2, 3, 5
    assert on_a["shared_errors"] == pytest.approx(1 / 5)  # pixel 4, of the five that either gets wrong
    # the oracle predicts 0 0 1 1 ? 2, and at pixel 4 the better student's guess: a's 0 or b's 1
    assert on_a["iou"] == pytest.approx([2 / 3, 1.0, 0.5])
    assert on_b["iou"] == pytest.approx([1.0, 2 / 3, 0.5])
    assert on_a["acc"] == pytest.approx(5 / 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_map_is_argmax_over_classes_with_the_first_of_ties(dtype):
    logits = torch.randn(3, 5, 7, 9).to(dtype)
    logits[0, :, 0, 0] = 1.0  # a tie across every class: class 0, as argmax says
    logits[1, 2:4, 1, 1] = 9.0  # a tie of classes 2 and 3: class 2
    labels = class_map(logits)
    assert labels.dtype == torch.int64 and torch.equal(labels, logits.argmax(1))
    assert labels[0, 0, 0] == 0 and labels[1, 1, 1] == 2
