"""Models users already have, as run dirs the export reads, so that the ordinary export, gate, card, predict,
app, Triton and bench run on them unchanged:

- a transformers SegFormer checkpoint becomes the `vit` student (this project's ViT is the SegFormer
  architecture): config.yaml (classes and palette from `id2label`, MiT size from the hidden sizes and depths, the
  decode head's width, transformers' LayerNorm eps) and vit.safetensors;
- an ONNX segmentation graph (torchvision, segmentation_models_pytorch, mmsegmentation's export, ...) is kept as
  it is, as <student>.onnx; the export wraps it in this project's pre/post (graphs.source_logits) and gates
  every engine against the source graph itself on ONNX Runtime fp32 (`SourceGraph`), since no PyTorch model
  exists.

Both hold imported.json (where the model came from) and gate/, a folder dataset of the images the parity gate
runs on (--images, else synthetic scenes) at the serving size, masked with the user's masks where --images has
them for every image, else with the source model's own class maps (an engine's gate mIoU is then its
class-balanced agreement with the source).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import yaml
from onnx import TensorProto
from PIL import Image

from export import graphs, parity
from export.parity import normalise
from serve.manifest import sha256
from train.checkpoint import save_weights
from train.config import ConfigError, load_config, save_config
from train.data import IGNORE_INDEX
from train.data.folder import IMAGE_SUFFIXES
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.models import build_student
from train.models.pretrained import MIT_SIZES, WEIGHT_FILES
from train.run_dir import CONFIG_FILE, IMPORTED_FILE, weights_file

log = logging.getLogger(__name__)

GATE_DIR = "gate"
TRANSFORMERS_EPS = 1e-5  # transformers builds the MiT's block and stage LayerNorms with torch's default eps
DEFAULT_SIZE = (512, 512)  # SegformerImageProcessor's, when the checkpoint has no preprocessor_config.json


class CheckpointError(ConfigError):
    """A checkpoint that cannot be imported: the message names the file and what does not fit."""


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_transformers(src: Path) -> dict:
    """What a transformers SegFormer folder describes: backbone, width, classes, normalisation, serving size."""
    config_file = src / "config.json"
    if not src.is_dir() or not config_file.is_file():
        raise CheckpointError(f"{src}: a transformers checkpoint is a folder with config.json (save_pretrained's)")
    config = _json(config_file)
    if config.get("model_type") != "segformer":
        raise CheckpointError(f"{config_file}: model_type is {config.get('model_type')!r}, not 'segformer'")
    labels = config.get("id2label")
    if not isinstance(labels, dict) or not labels:
        raise CheckpointError(f"{config_file}: no id2label (the classes of a segmentation model)")
    try:
        names = [str(labels[str(i)]) for i in range(len(labels))]
    except KeyError:
        raise CheckpointError(f"{config_file}: id2label's keys are not 0..{len(labels) - 1}") from None
    if len(names) > 255:
        raise CheckpointError(f"{config_file}: {len(names)} classes; a class map holds at most 255")
    sizes = (tuple(config.get("hidden_sizes", ())), tuple(config.get("depths", ())))
    if sizes not in MIT_SIZES:
        shape = f"hidden sizes {list(sizes[0])}, depths {list(sizes[1])}"
        raise CheckpointError(f"{config_file}: {shape} are those of no MiT (B0..B5)")
    weights = next((src / f for f in WEIGHT_FILES if (src / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{src}: no weights file ({' or '.join(WEIGHT_FILES)})")
    size, processor = DEFAULT_SIZE, src / "preprocessor_config.json"
    if processor.is_file():
        pre = _json(processor)
        for key, ours in (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)):
            if key in pre and not np.allclose(pre[key], ours, atol=1e-3):
                raise CheckpointError(f"{processor}: {key} {pre[key]} is not ImageNet's {list(ours)} (the engines')")
        given = pre.get("size") or {}
        size = (int(given["height"]), int(given["width"])) if {"height", "width"} <= set(given) else DEFAULT_SIZE
    mit = MIT_SIZES[sizes]
    return {
        "backbone": f"pvt_v2_b{mit[-1]}",
        "mit": mit,
        "decoder_channels": int(config.get("decoder_hidden_size", 256)),
        "names": names,
        "size": size,
        "weights": weights,
        "transformers": config.get("transformers_version"),
    }


def palette(count: int) -> list[list[int]]:
    """Distinct colours, background black: evenly spread hues at two lightnesses."""
    import colorsys

    colours = [[0, 0, 0]]
    for i in range(1, count):
        hue, light = (i * 0.618033988749895) % 1.0, 0.45 if i % 2 else 0.65
        colours.append([round(255 * c) for c in colorsys.hls_to_rgb(hue, light, 0.8)])
    return colours[:count]


def from_transformers(src: Path, run_dir: Path, images: Path | None = None, count: int = 16) -> Path:
    """Write `run_dir` from a transformers SegFormer folder (see the module's docstring)."""
    src = Path(src)
    found = read_transformers(src)
    names = found["names"]

    def build(tmp: Path) -> dict:
        overrides = [f"vit.backbone={found['backbone']}", f"vit.decoder_channels={found['decoder_channels']}"]
        cfg = _run_config(run_dir, names, palette(len(names)), [*overrides, f"vit.norm_eps={TRANSFORMERS_EPS}"])
        student = build_student(cfg.vit, len(names), init=found["weights"]).eval()
        masks = _gate_images(parity.torch_reference(student), tmp / GATE_DIR, images, count, found["size"], cfg.data)
        save_config(cfg, tmp / CONFIG_FILE)
        save_weights(student, weights_file(tmp, "vit"), {"student": "vit", "arch": "segformer", "imported": str(src)})
        return {"format": "transformers", "student": "vit", "path": str(src.resolve()), "file": found["weights"].name,
                "sha256": sha256(found["weights"]), "transformers": found["transformers"],
                "architecture": found["mit"], "classes": len(names), "gate_masks": masks}  # fmt: skip

    _write_run(run_dir, build)
    log.info("%s: %s, %d classes, serving %dx%d -> %s", src, found["mit"], len(names), *found["size"], run_dir)
    return run_dir


def _write_run(run_dir: Path, build) -> None:
    """`build(tmp)` writes the run dir's files into a folder beside `run_dir` and returns the provenance;
    the folder is renamed into place only when all is written, so a failure leaves no half-written run dir."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not (run_dir / IMPORTED_FILE).is_file():
        raise CheckpointError(f"{run_dir} exists and is no import: choose another --run")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}-", dir=run_dir.parent))
    try:
        provenance = build(tmp)
        (tmp / IMPORTED_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier import (its engines are rebuilt from this one)
        tmp.rename(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_config(run_dir: Path, names: list[str], colours: list[list[int]], overrides: list[str]):
    """An import's config: its classes, the gate folder as its data, the student's shape from `overrides`."""
    base = [f"name={Path(run_dir).name}", "method.preset=independent", "data.format=folder", "data.train_split=val"]
    cfg = load_config(None, [*base, f"data.root={(Path(run_dir) / GATE_DIR).resolve()}", *overrides])
    cfg.data.num_classes, cfg.data.class_names, cfg.data.palette = len(names), names, colours
    return cfg


# --- ONNX graphs ---------------------------------------------------------------------------------------------


def read_classes_file(path: Path) -> tuple[list[str], list[list[int]]]:
    """Class names and palette from YAML or JSON: a list of names, {"names": [...], "palette": [[r, g, b], ...]}
    (the folder layout's classes.json) or {id: name} (transformers' id2label); a palette is made when none is given."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not readable as YAML or JSON ({e})") from None
    colours = None
    if isinstance(data, dict) and "names" in data:
        data, colours = data["names"], data.get("palette")
    elif isinstance(data, dict):
        try:
            data = [data[k] for k in sorted(data, key=int)] if sorted(map(int, data)) == list(range(len(data))) else 0
        except (TypeError, ValueError):
            data = 0
    if not isinstance(data, list) or not data or not all(isinstance(n, (str, int)) for n in data):
        expected = "a list of class names, {names: [...], palette: [...]} or {id: name}"
        raise CheckpointError(f"{path}: expected {expected}")
    names = [str(n) for n in data]
    if len(names) > 255:
        raise CheckpointError(f"{path}: {len(names)} classes; a class map holds at most 255")
    colours = colours or palette(len(names))
    if len(colours) != len(names) or not all(isinstance(c, list) and len(c) == 3 for c in colours):
        raise CheckpointError(f"{path}: the palette needs one [r, g, b] per class ({len(names)})")
    return names, [[int(v) for v in c] for c in colours]


def _dims(value) -> list[int | None]:
    return [d.dim_value or None for d in value.type.tensor_type.shape.dim]


def read_onnx(src: Path, output: str | None = None) -> dict:
    """What an ONNX segmentation graph takes and gives: one 4-D float image input (NCHW, or NHWC: read from where
    its 3 channels are) and an N x C x h x w float output (`output`, else the first 4-D float one)."""
    if not Path(src).is_file():
        raise CheckpointError(f"{src}: no such ONNX file")
    try:
        model = onnx.load(str(src))
    except Exception as e:
        raise CheckpointError(f"{src}: not an ONNX model ({e})") from None
    graph, floats = model.graph, (TensorProto.FLOAT,)  # fp32 in and out: the engines' fp16 is made from it
    fed = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in fed]
    is_image = lambda v: v.type.tensor_type.elem_type in floats and len(v.type.tensor_type.shape.dim) == 4  # noqa: E731
    shown = ", ".join(f"{v.name} {_dims(v)}" for v in inputs) or "none"
    if len(inputs) != 1 or not is_image(inputs[0]):
        raise CheckpointError(f"{src}: expected one 4-D float (fp32) image input, found {shown}")
    dims = _dims(inputs[0])
    layout = "nchw" if dims[1] == 3 else "nhwc" if dims[3] == 3 else None
    if layout is None:
        raise CheckpointError(f"{src}: input {inputs[0].name} {dims} has 3 channels at neither dim 1 nor dim 3")
    n, h, w = (dims[0], dims[2], dims[3]) if layout == "nchw" else (dims[0], dims[1], dims[2])
    if n not in (None, 1):
        raise CheckpointError(f"{src}: input {inputs[0].name} is fixed at batch {n}: export it with batch 1 or dynamic")
    outs = {o.name: o for o in graph.output}
    chosen = outs.get(output) if output else next((o for o in graph.output if is_image(o)), None)
    if chosen is None or not is_image(chosen):
        what = f"output {output!r}" if output else "no output"
        raise CheckpointError(f"{src}: {what} is N x C x h x w float (outputs: {', '.join(outs)})")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise CheckpointError(f"{src}: opset {opset}; the wrapper's Resize needs 11 or later (export with opset >= 11)")
    out_hw, in_hw = _hw(chosen, "nchw"), _hw(inputs[0], layout)
    stride_1 = out_hw == in_hw and all(in_hw)  # the same sizes or symbols: the logits are at the input's size
    return {"model": model, "input": inputs[0].name, "layout": layout, "output": chosen.name,
            "fixed": [n, h, w], "channels": _dims(chosen)[1], "resize": not stride_1, "opset": opset}  # fmt: skip


def _hw(value, layout: str) -> list[int | str]:
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return dims[2:] if layout == "nchw" else dims[1:3]


class SourceGraph:
    """An imported graph on ONNX Runtime fp32, in this project's `logits` contract (ImageNet-normalised NCHW in,
    logits at the input size out): the gate's reference for the engines made from it."""

    def __init__(self, model: onnx.ModelProto, info: dict) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.info, self.scale, self.shift = info, *_renormalisation(info)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x * self.scale + self.shift
        x = x.transpose(0, 2, 3, 1) if self.info["layout"] == "nhwc" else x
        split = [x[i : i + 1] for i in range(len(x))] if self.info["fixed"][0] == 1 else [x]
        scores = np.concatenate([self.session.run([self.info["output"]], {self.info["input"]: p})[0] for p in split])
        scores = torch.from_numpy(scores.astype(np.float32))
        return F.interpolate(scores, size=x.shape[-2:] if self.info["layout"] == "nchw" else x.shape[1:3],
                             mode="bilinear", align_corners=False).numpy()  # fmt: skip


def _renormalisation(info: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scale and shift from ImageNet's normalisation (the engines' input) to the source's."""
    ours_mean, ours_std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    mean, std = np.asarray(info["mean"], np.float32), np.asarray(info["std"], np.float32)
    scale, shift = ours_std / std, (ours_mean - mean) / std
    return scale.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)


def source_graph(run_dir: Path, student: str, imported: dict) -> tuple[onnx.ModelProto, SourceGraph]:
    """An ONNX import's engine graph (the source in the `logits` contract) and its reference."""
    path = Path(run_dir) / f"{student}.onnx"
    info = {**imported["graph"], **read_onnx(path, imported["graph"]["output"])}
    scale, shift = _renormalisation(info)
    wrapped = graphs.source_logits(info["model"], info["input"], info["output"], info["layout"], scale, shift,
                                   info["resize"])  # fmt: skip
    return wrapped, SourceGraph(info["model"], info)


def from_onnx(src: Path, classes: Path, run_dir: Path, images: Path | None = None, count: int = 16,
              student: str = "cnn", size: tuple[int, int] | None = None, output: str | None = None,
              mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:  # fmt: skip
    """Write `run_dir` from an ONNX segmentation graph (see the module's docstring): the graph as
    <student>.onnx, the classes from `classes`; the serving size is the graph's where it is fixed, else `size`,
    else the first of `images`' size, else 512x512."""
    src = Path(src)
    info = read_onnx(src, output)
    names, colours = read_classes_file(classes)
    if info["channels"] not in (None, len(names)):
        raise CheckpointError(f"{src}: output {info['output']} has {info['channels']} channels, {classes} "
                              f"names {len(names)} classes")  # fmt: skip
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"--mean {list(mean)} --std {list(std)}: three values each, std > 0")
    fixed = info["fixed"]
    serving = tuple(fixed[1:]) if None not in fixed[1:] else tuple(size or _first_size(images) or DEFAULT_SIZE)
    graph = {"input": info["input"], "output": info["output"], "layout": info["layout"],
             "mean": [float(v) for v in mean], "std": [float(v) for v in std], "fixed": fixed}  # fmt: skip
    reference = SourceGraph(info["model"], {**info, **graph})
    channels = reference(np.zeros((1, 3, *serving), np.float32)).shape[1]
    if channels != len(names):
        raise CheckpointError(f"{src}: output {info['output']} has {channels} channels, {classes} names {len(names)}")

    def build(tmp: Path) -> dict:
        cfg = _run_config(run_dir, names, colours, [])
        masks = _gate_images(reference, tmp / GATE_DIR, images, count, serving, cfg.data)
        save_config(cfg, tmp / CONFIG_FILE)
        graphs.save(info["model"], tmp / f"{student}.onnx", check=False)  # external data (if any) taken in
        return {"format": "onnx", "student": student, "path": str(src.resolve()), "file": src.name,
                "sha256": sha256(src), "architecture": src.stem,
                "producer": f"{info['model'].producer_name} {info['model'].producer_version}".strip(),
                "classes": len(names), "graph": graph, "gate_masks": masks}  # fmt: skip

    _write_run(run_dir, build)
    log.info("%s: %s %s, %d classes, serving %dx%d -> %s", src, info["layout"], fixed, len(names), *serving, run_dir)
    return run_dir


# --- the gate's images ---------------------------------------------------------------------------------------


def _gate_images(reference, root: Path, images: Path | None, count: int, size: tuple[int, int], data) -> str:
    """A folder dataset of `count` images at the serving size, masked with the user's masks where `images` has
    masks/ with one for every image, else with `reference`'s class maps; returns which ("given" or "source")."""
    h, w = size
    pictures, masks = _pictures(images, count, size)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    ids = []
    for i, picture in enumerate(pictures):
        if masks is None:
            mask = reference(normalise(np.asarray(picture)[None]))[0].argmax(0).astype(np.uint8)
        else:
            mask = _checked_mask(masks[i], (w, h), data.num_classes)
        ids.append(f"{i:04d}")
        picture.save(root / "images" / f"{ids[-1]}.png")
        Image.fromarray(mask).save(root / "masks" / f"{ids[-1]}.png")
    (root / "splits" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "classes.json").write_text(json.dumps({"names": data.class_names, "palette": data.palette}))
    return "source" if masks is None else "given"


def _pictures(images: Path | None, count: int, size: tuple[int, int]):
    """The gate's RGB images at `size`, and their mask files (None unless `images`/masks has one for each)."""
    h, w = size
    if images is None:
        from train.data.synthetic import generate

        with tempfile.TemporaryDirectory() as scratch:
            generate(Path(scratch), num_train=0, num_val=count, height=h, width=w, seed=0, num_test=0)
            return [Image.open(f).convert("RGB") for f in sorted((Path(scratch) / "images").glob("*.png"))], None
    images, files = Path(images), _image_files(images, count)
    pictures = []
    for f in files:
        try:
            pictures.append(Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR))
        except OSError as e:
            raise CheckpointError(f"{f}: not readable as an image ({e})") from None
    masks = [images / "masks" / f"{f.stem}.png" for f in files]
    if not all(m.is_file() for m in masks):
        if (images / "masks").is_dir():
            log.warning("%s: not every gate image has a mask: the gate compares with the source's class maps", images)
        masks = None
    return pictures, masks


def _first_size(images: Path | None) -> tuple[int, int] | None:
    """The size of the first of the user's images: the serving size of a graph that takes any."""
    if images is None:
        return None
    with Image.open(_image_files(images, 1)[0]) as first:
        return first.height, first.width


def _image_files(images: Path, count: int) -> list[Path]:
    """The first `count` images of a folder (or of its images/ folder, beside masks/)."""
    folder = Path(images) / "images" if (Path(images) / "images").is_dir() else Path(images)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise CheckpointError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _checked_mask(path: Path, size: tuple[int, int], classes: int) -> np.ndarray:
    try:
        mask = np.asarray(Image.open(path).resize(size, Image.NEAREST))
    except OSError as e:
        raise CheckpointError(f"{path}: not readable as a mask ({e})") from None
    wrong = np.unique(mask[(mask >= classes) & (mask != IGNORE_INDEX)]) if mask.ndim == 2 else "not one channel"
    if len(wrong):
        raise CheckpointError(f"{path}: a mask holds class ids 0..{classes - 1} or {IGNORE_INDEX}, found {wrong}")
    return mask
