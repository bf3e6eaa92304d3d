from __future__ import annotations

import torch
from torch import nn

from train.config import EvalConfig
from train.evaluate import _windows, evaluate, predict_logits
from train.models import StudentOutput


class PixelModel(nn.Module):
    """Logits = the input's first channels at full resolution: predictions are known exactly."""

    def forward(self, x):
        return StudentOutput([x], x, x[:, :2] * 10)


def test_windows_cover_the_image_and_end_at_its_border():
    assert _windows(10, 4, 3) == [0, 3, 6]
    assert _windows(3, 4, 3) == [0]


def test_slide_equals_whole_for_a_pixelwise_model():
    x = torch.randn(2, 3, 13, 17)
    whole = predict_logits(PixelModel(), x, EvalConfig(mode="whole"), [8, 8])
    slide = predict_logits(PixelModel(), x, EvalConfig(mode="slide", crop_size=[5, 6], stride=[3, 4]), [8, 8])
    torch.testing.assert_close(slide, whole)


def test_ensemble_combines_both_students():
    x = torch.zeros(1, 3, 1, 2)
    x[0, 0] = torch.tensor([1.0, 0.0])  # student a: class 0 at pixel 0 (p=1.0), a tie at pixel 1
    labels = torch.tensor([[[0, 1]]])

    class Leaning(PixelModel):
        def forward(self, x):  # student b: class 1 everywhere, p = 0.88
            ones = torch.ones_like(x[:, 0])
            return StudentOutput([x], x, torch.stack([ones * 0, ones * 2], 1))

    r = evaluate({"a": PixelModel(), "b": Leaning()}, [(x, labels)], 2, torch.device("cpu"))
    assert r["a"]["acc"] == 0.5 and r["b"]["acc"] == 0.5
    assert r["ensemble"]["acc"] == 1.0  # mean of softmax: (1.0 + 0.12) / 2 > 0.5 at pixel 0, (0.5 + 0.88) / 2 at 1
    assert r["oracle"]["acc"] == 1.0 and r["oracle"]["one_right"] == 1.0  # each pixel has one right student


def test_eval_scale_predicts_on_the_fitted_image_and_answers_at_label_size():
    seen = []

    class Recording(PixelModel):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    x = torch.zeros(1, 3, 40, 60)
    x[..., :, 30:] = 1.0  # right half: class 0 wins
    logits = predict_logits(Recording(), x, EvalConfig(scale=[30, 10]), [8, 8])
    assert seen == [(10, 15)]  # fitted to (long 30, short 10): the short side binds
    assert logits.shape == (1, 2, 40, 60)
    assert (logits[0, 0, :, 35:] > 5).all() and (logits[0, 0, :, :25] < 5).all()
