"""Segment images, folders and videos with a run's engines and write the masks to disk (no PyTorch).

python -m serve.predict --engines runs/<name>/export --out OUT [--model cnn|vit|ensemble]
    [--backend auto|ort.cpu.fp32|ov.int8|...] [--slide [--window H W] [--stride H W]]
    [--confidence [--confidence-format npy]] [--overlay] [--force] INPUT...

--slide segments large images at full resolution with overlapping windows of the engines' serving size
(serve/slide.py) instead of scaling them into the engines' size range. --confidence also writes, beside each
class map, the probability of each pixel's class: <path>.confidence.png (uint16, probability x 65535) or
<path>.confidence.npy (float32); predictions.jsonl says which file holds what.

--backend auto (the default) takes the fastest gated engine this host runs, timed at start; a backend's name
(serve.backends.BACKENDS) takes that one. The flags of earlier versions still work: --variant fp32|fp16|bf16|
int8.cpu|int8.qdq with --backend onnxruntime|openvino|tensorrt and --device auto|cpu|cuda|tensorrt.

INPUT: an image, a folder (searched recursively), a glob ('photos/**/*.jpg', quoted) or a video.
- An image gives OUT/<path>.png: a palette PNG whose pixel values are class ids (palette = the
  dataset's colours), at the image's own size; with --overlay also OUT/overlay/<path>.jpg.
- A video gives OUT/<path>/<frame>.png (exact class ids; a lossy video would blur them) and with
  --overlay OUT/overlay/<path>.mp4 (H.264). Videos are read and written with PyAV, whose wheels ship
  FFmpeg (`pip install 'segdeploy[video]'`).
- OUT/predictions.jsonl gets one JSON line per image or video: file, size, each class's share of the
  pixels, timings. <path> is relative to the folder (or the glob's fixed part) the file was found in.

Images of one size run in batches up to the engines' max batch, while the next ones are decoded.
Bad files (unreadable, truncated, not an image, over --max-pixels) are skipped with a message naming
each; the exit status is 1 when any input failed. Every output is written under a temporary name and
renamed, and its predictions.jsonl line, written after it, records what made it (model, backend, the engine
files and their weights' hash, the sliding windows, the confidence format): a second run on the same OUT,
or a run killed and started again, skips the inputs whose record matches and redoes the others (--force:
all). With --slide each image is written as soon as its windows are done.
"""

from __future__ import annotations

import argparse
import errno
import glob
import itertools
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from serve.backends import BACKENDS
from serve.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from serve.segmenter import MODELS, Prediction, Segmenter, load_segmenter, select
from serve.slide import OVERLAP_WORK, SlideError, slide, sliding

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
RESULTS_FILE = "predictions.jsonl"
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True)
class Item:
    source: Path
    rel: Path  # where its outputs go under OUT, suffix removed

    @property
    def video(self) -> bool:
        return self.source.suffix.lower() in VIDEO_SUFFIXES


def collect(inputs: list[str], skip: Path | None = None) -> tuple[list[Item], list[str]]:
    """Every file the inputs name, with its output path; and the inputs that named nothing. Files under `skip`
    (the output folder, when it lies inside an input folder) are not inputs."""
    items, missing = [], []
    outputs = skip.resolve() if skip is not None else None
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = [(f, f.relative_to(path)) for f in sorted(path.rglob("*")) if _media(f)]
        elif path.is_file():
            found = [(path, Path(path.name))]
        elif glob.has_magic(raw):
            base = Path(*[part for part in path.parts if not glob.has_magic(part)][: _fixed_parts(path)])
            found = [(Path(f), Path(f).relative_to(base)) for f in sorted(glob.glob(raw, recursive=True))]
            found = [(f, rel) for f, rel in found if f.is_file()]
        else:
            found = []
        if outputs is not None and not path.is_file():  # a folder or glob that holds OUT: not its masks
            found = [(f, rel) for f, rel in found if not f.resolve().is_relative_to(outputs)]
        if not found:
            missing.append(f"{raw}: no such file, or no image or video in it")
        items += [Item(f, rel.with_suffix("")) for f, rel in found]
    return items, missing


def _media(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES


def _fixed_parts(path: Path) -> int:
    """How many leading parts of a glob have no wildcard (its base folder)."""
    for i, part in enumerate(path.parts):
        if glob.has_magic(part):
            return i
    return len(path.parts)


CONFIDENCE = {  # how a confidence map is written: file suffix, what the file holds
    "png": (".confidence.png", "uint16 PNG: the probability of the chosen class x 65535"),
    "npy": (".confidence.npy", "float32 NumPy array: the probability of the chosen class"),
}


def made_by(segmenter: Segmenter, backend: str, slide: tuple | None, confidence: str | None) -> dict:
    """What makes an output: the model, the backend, each engine file and the weights it came from, the sliding
    windows and the confidence format. A rerun whose recipe differs redoes the output."""
    engines = [
        {"student": e.manifest.student, "file": e.entry.file, "weights_sha256": e.manifest.source.get("sha256")}
        for e in segmenter.engines
    ]
    return {"model": segmenter.name, "backend": backend, "engines": engines, "slide": slide, "confidence": confidence}


def recorded(path: Path) -> dict[str, dict]:
    """The newest record of each output in a predictions.jsonl (a line cut by a kill is no record)."""
    found = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            line = json.loads(line)
            found[line["output"]] = line
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return found


class Writer:
    """Output paths and files of one OUT folder, and the record of what made each."""

    def __init__(
        self, out: Path, segmenter: Segmenter, overlay: bool, confidence: str | None = None, recipe: dict | None = None
    ) -> None:
        self.out, self.segmenter, self.overlay, self.confidence = out, segmenter, overlay, confidence
        self.recipe = recipe or {}
        self.flat_palette = [c for colour in segmenter.palette.tolist() for c in colour]
        self.records = recorded(out / RESULTS_FILE)

    def confidence_path(self, item: Item) -> Path:
        return self.out / item.rel.with_name(item.rel.name + CONFIDENCE[self.confidence][0])

    def labels_path(self, item: Item) -> Path:
        return self.out / (item.rel if item.video else item.rel.with_suffix(".png"))

    def overlay_path(self, item: Item) -> Path:
        return self.out / "overlay" / item.rel.with_suffix(".mp4" if item.video else ".jpg")

    def done(self, item: Item) -> bool:
        """Its outputs are on disk and its record says they were made as this run would make them."""
        marker = self.labels_path(item) / "summary.json" if item.video else self.labels_path(item)
        confidence = not self.confidence or item.video or self.confidence_path(item).is_file()
        files = marker.is_file() and (not self.overlay or self.overlay_path(item).is_file()) and confidence
        record = self.records.get(str(self.labels_path(item).relative_to(self.out)), {})
        return files and record.get("made_by") == self.recipe

    def class_map(self, labels: np.ndarray, path: Path) -> None:
        img = Image.fromarray(labels, "P")
        img.putpalette(self.flat_palette)
        _atomic_save(img, path)

    def blend(self, image: np.ndarray, labels: np.ndarray) -> np.ndarray:
        colours = self.segmenter.colorize(labels).astype(np.float32)
        return (image * (1 - OVERLAY_ALPHA) + colours * OVERLAY_ALPHA).astype(np.uint8)

    def image(self, item: Item, image: np.ndarray, prediction: Prediction) -> dict:
        extra = {"batch": prediction.batch, "windows": prediction.windows}
        if self.confidence:  # before the class map, which marks the image done
            extra["confidence"] = self.confidence_map(prediction.confidence, self.confidence_path(item))
        self.class_map(prediction.labels, self.labels_path(item))
        if self.overlay:
            _atomic_save(Image.fromarray(self.blend(image, prediction.labels)), self.overlay_path(item), quality=90)
        labels = prediction.labels
        return self.record(item, self.counts(labels), labels.shape, prediction.timings, **extra)

    def confidence_map(self, confidence: np.ndarray, path: Path) -> dict:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.confidence == "npy":
            tmp = path.with_name(f".{path.name}.tmp.npy")
            try:
                np.save(tmp, confidence.astype(np.float32))
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)
        else:
            _atomic_save(Image.fromarray(np.round(confidence * 65535).astype(np.uint16)), path)
        return {"file": str(path.relative_to(self.out)), "holds": CONFIDENCE[self.confidence][1]}

    def counts(self, labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels.ravel(), minlength=len(self.segmenter.classes))

    def record(self, item: Item, counts: np.ndarray, size: tuple[int, int], timings: dict, **extra) -> dict:
        """The predictions.jsonl line of an image or a video: its size, each class's share of the pixels."""
        total = counts.sum()
        shares = {name: round(float(c) / total, 6) for name, c in zip(self.segmenter.classes, counts, strict=True) if c}
        return {
            "file": str(item.source),
            "output": str(self.labels_path(item).relative_to(self.out)),
            "height": int(size[0]),
            "width": int(size[1]),
            **extra,
            "shares": shares,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "made_by": self.recipe,
        }


def _atomic_save(img: Image.Image, path: Path, **kwargs) -> None:
    """Written under a temporary name and renamed: a killed run leaves no half file that counts as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()], **kwargs)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
    os.replace(tmp, path)


def read_ahead(pool: ThreadPoolExecutor, fn, items: list, depth: int):
    """(item, future of fn(item)) in order, with at most `depth` decodes in flight."""
    pending: deque[tuple[Item, Future]] = deque()
    upcoming = iter(items)
    for item in upcoming:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= depth:
            break
    while pending:
        item, future = pending.popleft()
        if (following := next(upcoming, None)) is not None:
            pending.append((following, pool.submit(fn, following)))
        yield item, future


def predict_images(items: list[Item], run, writer: Writer, max_pixels: int, results, batch_size: int) -> list[str]:
    """`run(images) -> predictions`: the segmenter's batches (`batch_size` images), or its sliding windows image by
    image (`batch_size` 1: each is written as soon as it is done)."""
    segmenter = writer.segmenter
    failures: list[str] = []
    batch: list[tuple[Item, np.ndarray]] = []
    bar = tqdm(total=len(items), unit="img", desc="images", file=sys.stderr, disable=not items)
    with ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2))) as pool:
        writes: deque[Future] = deque()

        def flush() -> None:
            predictions = run([image for _, image in batch])
            for (item, image), prediction in zip(batch, predictions, strict=True):
                writes.append(pool.submit(writer.image, item, image, prediction))
            batch.clear()
            while writes and (writes[0].done() or len(writes) > 4 * segmenter.max_batch):
                results(writes.popleft().result())
                bar.update(1)

        decode = lambda item: read_image(item.source, max_pixels, name=str(item.source))  # noqa: E731
        for item, future in read_ahead(pool, decode, items, depth=2 * segmenter.max_batch):
            try:
                batch.append((item, future.result()))
            except ImageError as e:
                failures.append(str(e))
                bar.write(f"skipped: {e}", file=sys.stderr)
                bar.update(1)
                continue
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        while writes:
            results(writes.popleft().result())
            bar.update(1)
    bar.close()
    return failures


def predict_video(item: Item, run, writer: Writer, max_pixels: int) -> dict:
    """Frames in batches; a class-map PNG per frame and, with --overlay, an H.264 overlay video."""
    import av

    segmenter = writer.segmenter
    frames_dir = writer.labels_path(item)
    frames_dir.mkdir(parents=True, exist_ok=True)
    totals = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
    counts, index, started = np.zeros(len(segmenter.classes), np.int64), 0, time.perf_counter()
    try:
        with av.open(str(item.source)) as source:
            stream = source.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise ImageError(f"{item.source}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
            sink = encoder = None
            if writer.overlay:
                path = writer.overlay_path(item)
                path.parent.mkdir(parents=True, exist_ok=True)
                sink = av.open(str(path.with_name(f".{path.name}.tmp")), "w", format="mp4")
                encoder = sink.add_stream("libx264", rate=stream.average_rate or 25)
                encoder.width, encoder.height, encoder.pix_fmt = w - w % 2, h - h % 2, "yuv420p"  # 4:2:0: even sides
            bar = tqdm(total=stream.frames or None, unit="frame", desc=item.source.name, file=sys.stderr)
            frames = (f.to_ndarray(format="rgb24") for f in source.decode(stream))
            while chunk := list(itertools.islice(frames, segmenter.max_batch)):
                for image, prediction in zip(chunk, run(chunk), strict=True):
                    writer.class_map(prediction.labels, frames_dir / f"{index:06d}.png")
                    counts += writer.counts(prediction.labels)
                    if sink is not None:
                        blended = writer.blend(image, prediction.labels)[: encoder.height, : encoder.width]
                        for packet in encoder.encode(av.VideoFrame.from_ndarray(blended, format="rgb24")):
                            sink.mux(packet)
                    index += 1
                for k in totals:
                    totals[k] += prediction.timings[k]
                bar.update(len(chunk))
            bar.close()
            if sink is not None:
                for packet in encoder.encode():
                    sink.mux(packet)
                sink.close()
                os.replace(path.with_name(f".{path.name}.tmp"), path)
    except av.FFmpegError as e:
        raise ImageError(f"{item.source}: not a video this build of FFmpeg reads ({e})") from None
    if index == 0:
        raise ImageError(f"{item.source}: the video holds no frames")
    rate = round(index / (time.perf_counter() - started), 2)
    line = writer.record(item, counts, (h, w), totals, frames=index, fps=rate)
    (frames_dir / "summary.json").write_text(json.dumps(line, indent=2))  # written last: marks the video done
    return line


def compact(path: Path) -> None:
    """One line per output (the newest) after reruns, without the line a kill may have cut."""
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in recorded(path).values()))
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders, globs, videos")
    p.add_argument(
        "--engines", required=True, type=Path, help="a run's export dir (holding cnn/ and vit/), or one exported .onnx"
    )
    p.add_argument("--out", required=True, type=Path, help="where the class maps go")
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--backend", default="auto", help=f"auto (the fastest here), or one of {', '.join(BACKENDS)}")
    p.add_argument("--variant", default="auto", help="a graph variant to pin (fp32, fp16, int8.cpu, int8.qdq)")
    p.add_argument("--device", default="auto", help="with a runtime name as --backend: auto, cpu, cuda, tensorrt")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    p.add_argument("--slide", action="store_true", help="sliding windows at full resolution instead of fitting")
    p.add_argument("--window", type=int, nargs=2, metavar=("H", "W"), help="slide window (default: serving size)")
    p.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 window)")
    p.add_argument("--confidence", action="store_true", help="also write each pixel's probability of its class")
    p.add_argument("--confidence-format", default="png", choices=list(CONFIDENCE), help="png (uint16) or npy (float32)")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays (JPEG / H.264)")
    p.add_argument("--force", action="store_true", help="redo inputs whose outputs exist")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger inputs are skipped")
    return p


def open_segmenter(args: argparse.Namespace):
    """The segmenter the flags ask for, `run(images) -> predictions` over it (fitted, or sliding windows) and the
    recipe that makes its outputs (`made_by`)."""
    backend, variant, how = select(args.engines, args.model, args.backend, args.variant, args.device)
    if how:
        print(f"engine: {how}", file=sys.stderr)
    scores = args.slide or bool(args.confidence)
    segmenter = load_segmenter(args.engines, args.model, backend, args.threads, variant, scores)
    confidence = args.confidence_format if args.confidence else None
    if not args.slide:
        return segmenter, segmenter.predict_batch, made_by(segmenter, backend.name, None, confidence)
    s = sliding(segmenter, args.window, args.stride)
    if (coverage := s.window[0] * s.window[1] / (s.stride[0] * s.stride[1])) > OVERLAP_WORK:
        raise SlideError(f"a stride of {s.stride} covers each pixel {coverage:.0f} times: over {OVERLAP_WORK}")
    print(f"sliding windows of {s.window[0]}x{s.window[1]}, stride {s.stride[0]}x{s.stride[1]}", file=sys.stderr)

    def one(image: np.ndarray) -> Prediction:
        (h, w), (wh, ww) = image.shape[:2], s.window
        if h < segmenter.min_hw[0] or w < segmenter.min_hw[1]:
            print(f"a {h}x{w} image is under the engines' smallest input: fitted", file=sys.stderr)
            return segmenter.predict(image)
        if h < wh or w < ww:  # as training's slide evaluation does
            print(f"a {h}x{w} image is smaller than the {wh}x{ww} window: windows cut to the image", file=sys.stderr)
        return slide(segmenter, image, s, args.max_pixels)

    def run(images: list[np.ndarray]) -> list[Prediction]:
        return [one(image) for image in images]

    windows = {"window": list(s.window), "stride": list(s.stride)}
    return segmenter, run, made_by(segmenter, backend.name, windows, confidence)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    items, missing = collect(args.inputs, skip=args.out)
    try:
        segmenter, run, recipe = open_segmenter(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    writer = Writer(args.out, segmenter, args.overlay, recipe["confidence"], recipe)
    outputs = {}
    for item in items:
        if (other := outputs.setdefault(writer.labels_path(item), item)) is not item:
            print(
                f"error: {item.source} and {other.source} would both write {writer.labels_path(item)}", file=sys.stderr
            )
            return 2
    for message in missing:
        print(f"skipped: {message}", file=sys.stderr)
    todo = [item for item in items if args.force or not writer.done(item)]
    if skipped := len(items) - len(todo):
        print(f"{skipped} of {len(items)} inputs already done in {args.out} (--force redoes them)", file=sys.stderr)
    if redone := sum(1 for i in todo if not args.force and writer.labels_path(i).exists()):
        print(f"{redone} inputs made otherwise before (model, engines or options): made again", file=sys.stderr)
    if args.confidence and any(i.video for i in todo):
        print("confidence maps are written for images; videos get their class maps", file=sys.stderr)
    try:
        failures = write_all(args, todo, run, writer)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        done = len(recorded(args.out / RESULTS_FILE)) - (len(items) - len(todo))
        free = shutil.disk_usage(args.out).free
        sizes = [p.stat().st_size for p in args.out.rglob("*.png")][:1000]
        need = (len(todo) - done) * (sum(sizes) / len(sizes) if sizes else 0)
        print(
            f"error: no space left on the disk of {args.out} ({free / 2**20:.0f} MiB free; the {len(todo) - done} "
            f"inputs left need about {need / 2**20:.0f} MiB more): the {done} finished outputs and their records are "
            "kept; free some space and run the same command again (it skips them)",
            file=sys.stderr,
        )
        return 2
    summary = f"{len(todo) - len(failures)} of {len(todo)} inputs segmented into {args.out}"
    print(summary + (f"; {len(failures) + len(missing)} failed" if failures or missing else ""))
    return 1 if failures or missing else 0


def write_all(args: argparse.Namespace, todo: list[Item], run, writer: Writer) -> list[str]:
    """Every image and video of `todo`, each line appended to predictions.jsonl as it is done; the failures."""
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / RESULTS_FILE
    with results_path.open("a") as results:

        def record(line: dict) -> None:
            results.write(json.dumps(line) + "\n")
            results.flush()

        images = [i for i in todo if not i.video]
        batch = 1 if args.slide else writer.segmenter.max_batch
        failures = predict_images(images, run, writer, args.max_pixels, record, batch)
        for item in (i for i in todo if i.video):
            try:
                record(predict_video(item, run, writer, args.max_pixels))
            except ImageError as e:
                failures.append(str(e))
                print(f"skipped: {e}", file=sys.stderr)
    compact(results_path)
    return failures


if __name__ == "__main__":
    sys.exit(main())
