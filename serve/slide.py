"""Sliding-window inference on any engine: large images at full detail instead of scaled into the profile.

Windows of the engine's serving size (its profile's `opt`, or one asked for) step over the image at a stride
(2/3 of the window by default) so that they overlap and the last one ends at the border; the windows run
in batches up to the engine's maximum batch through the `logits` engines; each student's logits are
averaged where windows overlap, then turned into probabilities (the ensemble: the mean of both students'),
and one argmax gives the class map, with the chosen class's probability as the confidence. This is
`python -m train.evaluate`'s `eval.mode=slide` step for step, so an engine scores what its PyTorch student
scores in that mode (benchmarks.evaluate checks it). An image smaller than a window in one dimension runs with
the window cut to the image there (as training's evaluation does); `serve.predict` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serve.segmenter import Prediction, Segmenter, softmax

OVERLAP_WORK = 9  # windows may cover the image at most this many times over (stride 1/3 of the window)


class SlideError(ValueError):
    """A window or stride the engines cannot take, or more windows than the pixel limit allows."""


@dataclass(frozen=True)
class Sliding:
    window: tuple[int, int]  # H, W
    stride: tuple[int, int]


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """2/3 of the window, as training's eval.mode=slide: windows overlap by a third."""
    return max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3)


def sliding(segmenter: Segmenter, window: tuple[int, int] | None = None, stride=None) -> Sliding:
    """The window (default: the engines' serving size) and stride (default: 2/3 of the window), checked."""
    window = tuple(window or segmenter.opt_hw)
    low, high = segmenter.min_hw, segmenter.max_hw
    if not all(lo <= w <= hi for w, lo, hi in zip(window, low, high, strict=True)):
        raise SlideError(
            f"window {window[0]}x{window[1]} is outside the engines' profile {low[0]}x{low[1]} .. {high[0]}x{high[1]}"
        )
    stride = tuple(stride or default_stride(window))
    if not all(0 < s <= w for s, w in zip(stride, window, strict=True)):
        raise SlideError(
            f"stride {stride[0]}x{stride[1]} must be at least 1 and at most the window {window[0]}x{window[1]}"
        )
    return Sliding(window, stride)  # type: ignore[arg-type]


def starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side: every `stride`, the last one ending at the border."""
    last = max(size - window, 0)
    return sorted({min(start, last) for start in range(0, last + stride, stride)})


def boxes(height: int, width: int, s: Sliding) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every window; a window is cut to the image where the image is smaller."""
    wh, ww = min(s.window[0], height), min(s.window[1], width)
    return [(top, left, wh, ww) for top in starts(height, wh, s.stride[0]) for left in starts(width, ww, s.stride[1])]


def slide(
    segmenter: Segmenter, image: np.ndarray, s: Sliding, max_pixels: int | None = None, batch: int | None = None
) -> Prediction:
    """The class map and confidence of one image, by sliding windows (the segmenter must run logits engines),
    `batch` windows per engine call (default: the engines' maximum batch)."""
    if segmenter.labels_io:
        raise SlideError("a sliding window needs class scores: open the model with scores=True (its logits engines)")
    h, w = image.shape[:2]
    if h < segmenter.min_hw[0] or w < segmenter.min_hw[1]:
        raise SlideError(f"a {h}x{w} image is under the engines' smallest input {segmenter.min_hw}: run it fitted")
    cells = boxes(h, w, s)
    if max_pixels and len(cells) * cells[0][2] * cells[0][3] > OVERLAP_WORK * max_pixels:
        raise SlideError(
            f"{len(cells)} windows of {s.window[0]}x{s.window[1]} (stride {s.stride[0]}x{s.stride[1]}) over a {h}x{w} "
            f"image: more than {OVERLAP_WORK}x the pixel limit ({max_pixels}); use a larger stride or a smaller image"
        )
    t0 = time.perf_counter()
    x = ((image.astype(np.float32) - segmenter.mean) / segmenter.std).transpose(2, 0, 1)
    probs = np.zeros((len(segmenter.classes), h, w), np.float32)
    inference, per_call = 0.0, min(batch or segmenter.max_batch, segmenter.max_batch)
    for engine in segmenter.engines:
        total = np.zeros((len(segmenter.classes), h, w), np.float32)
        count = np.zeros((h, w), np.float32)
        for first in range(0, len(cells), per_call):
            chunk = cells[first : first + per_call]
            batch = np.stack([x[:, top : top + wh, left : left + ww] for top, left, wh, ww in chunk])
            started = time.perf_counter()
            logits = engine.run(np.ascontiguousarray(batch))
            inference += time.perf_counter() - started
            for (top, left, wh, ww), scores in zip(chunk, logits, strict=True):
                total[:, top : top + wh, left : left + ww] += scores
                count[top : top + wh, left : left + ww] += 1
        probs += softmax((total / count)[None])[0]  # each student's averaged logits, then its probabilities
    probs /= len(segmenter.engines)
    labels, confidence = probs.argmax(0).astype(np.uint8), probs.max(0)
    elapsed = time.perf_counter() - t0
    timings = {"preprocess": 0.0, "inference": 1e3 * inference, "postprocess": 1e3 * (elapsed - inference)}
    return Prediction(labels, timings, min(len(cells), per_call), confidence, len(cells))
