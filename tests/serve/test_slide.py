"""Sliding-window inference: hand-built scores with known answers, coverage, batching, and the real engines."""

from __future__ import annotations

import numpy as np
import pytest

from serve.manifest import EngineEntry, Manifest
from serve.segmenter import Segmenter, load_segmenter
from serve.slide import OVERLAP_WORK, SlideError, boxes, slide, sliding

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class PixelScores:
    """A logits engine whose class-1 score at a pixel is its red channel (normalised), class 0's its negative:
    the class map is known exactly, whatever the window."""

    def __init__(self, calls: list[int]) -> None:
        shapes = {"min": [1, 8, 8], "opt": [1, 16, 16], "max": [4, 32, 32]}
        self.manifest = Manifest("cnn", "toy", "toy", ["dark", "bright"], [[0, 0, 0], [255, 255, 255]],
                                 {"mean": MEAN, "std": STD, "scale": 255}, shapes, {}, {})  # fmt: skip
        self.entry = EngineEntry("model.fp32.logits.onnx", "onnx", "logits", "fp32", "fp32")
        self.calls = calls

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.shape[0])
        red = batch[:, 0]
        return np.stack([-red, red], axis=1)


def toy(calls=None) -> Segmenter:
    return Segmenter("cnn", [PixelScores([] if calls is None else calls)])


def test_a_constant_image_gives_its_class_and_two_halves_give_both():
    segmenter, s = toy(), sliding(toy())
    assert s.window == (16, 16) and s.stride == (10, 10)  # the serving size, 2/3 of it
    dark = np.zeros((40, 50, 3), np.uint8)
    assert (slide(segmenter, dark, s).labels == 0).all()
    halves = dark.copy()
    halves[:, 25:] = 255
    p = slide(segmenter, halves, s)
    assert (p.labels[:, :25] == 0).all() and (p.labels[:, 25:] == 1).all()
    assert p.confidence.shape == (40, 50) and (p.confidence > 0.5).all() and p.windows == len(boxes(40, 50, s))


def test_windows_cover_every_pixel_at_the_stride_and_end_at_the_border():
    s = sliding(toy(), (16, 16), (10, 10))
    cells = boxes(40, 50, s)
    assert sorted({t for t, _, _, _ in cells}) == [0, 10, 20, 24] and sorted({left for _, left, _, _ in cells}) == [
        0, 10, 20, 30, 34]  # fmt: skip
    covered = np.zeros((40, 50), int)
    for t, left, h, w in cells:
        covered[t : t + h, left : left + w] += 1
    assert covered.min() >= 1
    small = boxes(12, 50, s)  # shorter than a window: the window is cut to the image's height
    assert {(t, h) for t, _, h, _ in small} == {(0, 12)}


def test_batched_windows_equal_windows_one_at_a_time():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    calls_batched, calls_single = [], []
    batched = slide(toy(calls_batched), image, sliding(toy()))
    single = slide(toy(calls_single), image, sliding(toy()), batch=1)
    assert np.array_equal(batched.labels, single.labels) and np.allclose(batched.confidence, single.confidence)
    assert max(calls_batched) == 4 and set(calls_single) == {1} and sum(calls_batched) == sum(calls_single)


def test_windows_and_strides_the_engines_cannot_take_are_refused_in_one_line():
    segmenter = toy()
    with pytest.raises(SlideError, match=r"window 64x64 is outside the engines' profile 8x8 \.\. 32x32"):
        sliding(segmenter, (64, 64))
    for stride in ((0, 5), (20, 5)):
        with pytest.raises(SlideError, match=r"stride .* at least 1 and at most the window 16x16"):
            sliding(segmenter, (16, 16), stride)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(SlideError, match=rf"windows of 16x16 .* more than {OVERLAP_WORK}x the pixel limit \(100\)"):
        slide(segmenter, image, sliding(segmenter), max_pixels=100)
    with pytest.raises(SlideError, match="under the engines' smallest input"):
        slide(segmenter, np.zeros((4, 40, 3), np.uint8), sliding(segmenter))
    with pytest.raises(SlideError, match="needs class scores"):
        labels_only = toy()
        labels_only.labels_io = True
        slide(labels_only, image, sliding(segmenter))


@pytest.mark.parametrize("model", ["cnn", "ensemble"])
def test_on_an_image_no_larger_than_one_window_slide_equals_the_fitted_mode(engines, model):
    segmenter = load_segmenter(engines, model, "ort.cpu.fp32", scores=True)
    image = np.random.default_rng(1).integers(0, 256, (*segmenter.opt_hw, 3), dtype=np.uint8)
    fitted, slid = segmenter.predict(image), slide(segmenter, image, sliding(segmenter))
    assert slid.windows == 1
    assert np.array_equal(fitted.labels, slid.labels) and np.allclose(fitted.confidence, slid.confidence, atol=1e-5)


def test_the_triton_hosts_models_slide_when_asked_and_refuse_bad_batches():
    from serve.triton_server import class_maps

    segmenter = toy()
    images = np.zeros((2, 40, 50, 3), np.uint8)
    images[:, :, 25:] = 255
    slid = class_maps(segmenter, images, 4096, sliding(segmenter))
    assert slid.shape == (2, 40, 50) and (slid[:, :, :25] == 0).all() and (slid[:, :, 25:] == 1).all()
    with pytest.raises(ValueError, match="over the 32 pixel limit"):
        class_maps(segmenter, images, 32, sliding(segmenter))
    with pytest.raises(ValueError, match="empty batch"):
        class_maps(segmenter, images[:0], 4096)
