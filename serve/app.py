"""The Gradio segmentation demo over a run's engine dirs (no PyTorch, no dataset needed).

Upload an image (or pick an example from the dataset's eval split, copied beside the engine dirs
at export), choose the model (CNN, ViT, their ensemble) and the backend (a runtime, device and precision
of serve.backends.BACKENDS) among the engines present, and get a colour overlay with adjustable opacity,
the class map, a legend with each class's share of pixels and the latency of each stage. The same
function is the `/segment` API.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

import gradio as gr
import numpy as np
from gradio import processing_utils
from PIL import Image

from serve.backends import BACKENDS, usable
from serve.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from serve.manifest import hex_colour, read_manifest
from serve.segmenter import Prediction, Segmenter, auto_choice, choices, describe_choice, engine_dirs, load_segmenter
from serve.slide import SlideError, slide, sliding

log = logging.getLogger(__name__)

DISPLAY_SIDE = 1600  # the overlay is drawn at most this large; the class map keeps full size
KEEP_CLASS_FILES = 64  # class-map PNGs kept for download: Gradio copies each into its cache on return


def _save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's `processing_utils.save_pil_to_cache`, without its race: Gradio names the file by
    its content hash and rewrote it in place on every call, so identical outputs of concurrent
    requests truncated a file while it was being sent. Same content, same name: write once, atomically."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _patch_gradio() -> bool:
    """Install the fix above where Gradio's private function is still the one it replaces (checked by
    signature and helpers); elsewhere keep Gradio's own, and say so."""
    original = processing_utils.save_pil_to_cache
    params = list(inspect.signature(original).parameters)
    helpers = all(hasattr(processing_utils, h) for h in ("encode_pil_to_bytes", "hash_bytes"))
    if params == ["img", "cache_dir", "name", "format"] and helpers:
        processing_utils.save_pil_to_cache = _save_pil_to_cache  # also serves save_img_array_to_cache
        return True
    log.warning(
        "gradio %s changed processing_utils.save_pil_to_cache %s: its own version is used "
        "(identical outputs of concurrent requests may be truncated while sent)",
        gr.__version__,
        params,
    )
    return False


GRADIO_PATCHED = _patch_gradio()


def undecoded(upload: gr.Image) -> gr.Image:
    """Hand an uploaded file to the handler as it is: decoding untrusted files is read_image's job,
    with its limits and its readable errors (gr.Image would open it first and fail with its own)."""
    decode = upload.preprocess

    def preprocess(payload):
        return decode(payload) if payload is None or payload.path is None else payload.path  # data: URLs decode

    upload.preprocess = preprocess  # an instance attribute: a subclass would make Gradio write a .pyi here
    return upload


class Demo:
    """The app's state: which engines exist, and the segmenters opened so far (one per choice)."""

    def __init__(self, engines: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int = 0) -> None:
        self.engines, self.max_pixels, self.threads = Path(engines), max_pixels, threads
        self.available = [(m, b.name) for m, b in choices(self.engines, usable())]
        if not self.available:
            raise FileNotFoundError(f"{self.engines}: no engine this host can run")
        self.models = list(dict.fromkeys(m for m, _ in self.available))
        self.segmenters: dict[tuple[str, str, bool], Segmenter] = {}
        self.lock = threading.Lock()
        self.outputs = Path(tempfile.mkdtemp(prefix="segdeploy-"))
        weakref.finalize(self, shutil.rmtree, self.outputs, True)  # gone with the app (or at exit)
        manifests = {s: read_manifest(d) for s, d in engine_dirs(self.engines).items()}
        manifest = next(iter(manifests.values()))
        self.color_map = {name: hex_colour(rgb) for name, rgb in zip(manifest.classes, manifest.palette, strict=True)}
        self.labels = {s: f"{s.upper()} ({m.arch}, {m.backbone})" for s, m in manifests.items()}
        self.labels["ensemble"] = "Ensemble (mean softmax)"
        # The default engine: the fastest gated one of the first model on this host, by the rule every command
        # shares (serve.segmenter.auto_choice: the same engine on every start).
        first = self.models[0]
        backend, times, how = auto_choice(self.engines, first, [BACKENDS[b] for b in self.backends(first)])
        self.default = (first, backend)
        self.default_why = f"{describe_choice(first, backend, times)}; {how}"
        log.info("default engine: %s", self.default_why)

    def backends(self, model: str) -> list[str]:
        return [b for m, b in self.available if m == model]

    def segmenter(self, model: str, backend: str, scores: bool = False) -> Segmenter:
        """The segmenter of a choice, opened once (`scores`: its logits engines, for sliding windows)."""
        if (model, backend) not in self.available:
            have = ", ".join(f"{m} on {b}" for m, b in self.available)
            raise gr.Error(f"no {model} engine for {backend} here (available: {have})")
        key = (model, backend, scores)
        with self.lock:
            if key not in self.segmenters:
                self.segmenters[key] = load_segmenter(self.engines, model, backend, self.threads, scores=scores)
            return self.segmenters[key]

    def predict(self, image: np.ndarray, model: str, backend: str, slide_it: bool) -> tuple[Segmenter, Prediction]:
        """Fitted into the engines' size range, or by sliding windows of their serving size (full detail)."""
        segmenter = self.segmenter(model, backend, scores=slide_it)
        if not slide_it or min(image.shape[0] - segmenter.min_hw[0], image.shape[1] - segmenter.min_hw[1]) < 0:
            return segmenter, segmenter.predict(image)
        try:
            return segmenter, slide(segmenter, image, sliding(segmenter), self.max_pixels)
        except SlideError as e:
            raise gr.Error(str(e)) from None

    def segment(self, image_path: str | None, model: str, backend: str, opacity: float, slide_it: bool = False):
        if not image_path:
            raise gr.Error("upload an image first")
        started = time.perf_counter()
        try:
            image = read_image(image_path, self.max_pixels, name=Path(image_path).name)
        except ImageError as e:
            raise gr.Error(str(e)) from None
        decoded = time.perf_counter()
        segmenter, prediction = self.predict(image, model, backend, slide_it)
        drawn = time.perf_counter()
        overlay, class_map, class_file, legend, details = self._render(segmenter, image, prediction.labels, opacity)
        timings = {
            "decode": 1e3 * (decoded - started),
            **prediction.timings,
            "render": 1e3 * (time.perf_counter() - drawn),
        }
        details.update(
            model=model, backend=backend, precision=BACKENDS[backend].precision, runtime=BACKENDS[backend].runtime,
            device=_device(segmenter), timings_ms=timings, image_size=list(image.shape[:2]), windows=prediction.windows,
            run_size=list(segmenter.opt_hw if prediction.windows > 1 else segmenter.fit(*image.shape[:2])),
        )  # fmt: skip
        latency = " · ".join(f"{stage} {ms:.1f} ms" for stage, ms in timings.items())
        if prediction.windows > 1:
            latency += f" · {prediction.windows} windows of {segmenter.opt_hw[0]}×{segmenter.opt_hw[1]}"
        return overlay, class_map, str(class_file), legend, details, f"**Latency** {latency}"

    def _render(self, segmenter: Segmenter, image: np.ndarray, labels: np.ndarray, opacity: float):
        counts = np.bincount(labels.ravel(), minlength=len(segmenter.classes))
        shares = counts / max(labels.size, 1)
        display, display_labels = image, labels
        scale = DISPLAY_SIDE / max(image.shape[:2])
        if scale < 1:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            display = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            display_labels = np.asarray(Image.fromarray(labels).resize(size, Image.NEAREST))
        alpha = float(np.clip(opacity, 0.0, 1.0))
        masks = [
            ((display_labels == c).astype(np.float32) * alpha, name)
            for c, name in enumerate(segmenter.classes)
            if counts[c]
        ]
        class_file = self.outputs / f"classes-{time.time_ns()}-{threading.get_ident()}.png"
        Image.fromarray(labels).save(class_file)  # the raw class map: one uint8 class index per pixel
        for old in sorted(self.outputs.glob("classes-*.png"))[:-KEEP_CLASS_FILES]:  # a long-running server
            old.unlink(missing_ok=True)
        colors = list(self.color_map.values())
        legend = _legend(segmenter.classes, colors, shares)
        details = {
            "classes": [
                {"index": c, "name": n, "color": colors[c], "share": float(shares[c])}
                for c, n in enumerate(segmenter.classes)
            ]
        }
        return (display, masks), segmenter.colorize(labels), class_file, legend, details


def _legend(classes: list[str], colors: list[str], shares: np.ndarray) -> str:
    rows = "".join(
        f"<tr><td><span style='display:inline-block;width:1em;height:1em;background:{color};"
        f"border:1px solid #888'></span></td><td>{name}</td><td style='text-align:right'>{100 * share:.1f}%</td></tr>"
        for name, color, share in zip(classes, colors, shares, strict=True)
    )
    return f"<table class='legend'><tr><th></th><th>class</th><th>pixels</th></tr>{rows}</table>"


def _device(segmenter: Segmenter) -> str:
    engine = segmenter.engines[0]
    return getattr(engine, "device", "cuda")


def build_app(demo: Demo, examples: Path | None = None) -> gr.Blocks:
    examples = examples or demo.engines / "examples"
    example_files = sorted(str(p) for p in examples.glob("*.png")) if examples.is_dir() else []
    first = demo.models[0]
    # delete_cache: Gradio's copies of uploads and outputs older than an hour go, checked every 10 min
    with gr.Blocks(title="segdeploy: compact segmentation students", delete_cache=(600, 3600)) as app:
        gr.Markdown(
            "## Semantic segmentation with compact students\n"
            f"Engines: `{demo.engines}` · {' / '.join(sorted({b.runtime for b in usable()}))}, "
            "no PyTorch on this host · "
            f"Default: {demo.default_why}",
            elem_id="header",
        )
        with gr.Row():
            with gr.Column():
                image = undecoded(gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"]))
                model = gr.Dropdown([(demo.labels[m], m) for m in demo.models], value=first, label="Model")
                # Every backend present: Gradio checks API calls against a dropdown's first choices, and
                # the default's (the fastest here) may be offered for one model only.
                every_backend = list(dict.fromkeys(b for _, b in demo.available))
                backend = gr.Dropdown(
                    every_backend, value=demo.default[1], label="Backend (runtime, device, precision)"
                )
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
                slide_it = gr.Checkbox(False, label="Sliding window: large images at full detail")
                run = gr.Button("Segment", variant="primary")
                if example_files:
                    gr.Examples([[f] for f in example_files], inputs=[image], label="Examples (eval split)")
            with gr.Column():
                overlay = gr.AnnotatedImage(label="Overlay", color_map=demo.color_map, elem_id="overlay")
                latency = gr.Markdown(elem_id="latency")
                legend = gr.HTML(label="Legend")
                with gr.Accordion("Class map and details", open=False):
                    with gr.Row():
                        class_map = gr.Image(label="Class map (palette)", type="numpy", format="png")
                        class_file = gr.File(label="Class map (uint8 class indices, PNG)")
                    details = gr.JSON(label="Details")

        def on_model(m, b):
            bs = demo.backends(m)
            return gr.update(choices=bs, value=b if b in bs else bs[0])

        model.change(on_model, [model, backend], [backend], queue=False, api_name=False)
        run.click(
            demo.segment,
            [image, model, backend, opacity, slide_it],
            [overlay, class_map, class_file, legend, details, latency],
            api_name="segment",
        )
    return app
