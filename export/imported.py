"""Models users already have, as run dirs the export reads: a transformers SegFormer checkpoint becomes the `vit`
student of a run dir (this project's ViT is the SegFormer architecture), so the ordinary export, gate, card,
predict, app, Triton and bench run on it unchanged.

The run dir holds config.yaml (classes and palette from `id2label`, MiT size from the hidden sizes and depths,
the decode head's width, transformers' LayerNorm eps), vit.safetensors, imported.json (where it came from) and
gate/, a folder dataset of the images the parity gate runs on (--images, else synthetic scenes) at the serving
size, each masked with the source model's own class map: the gate's mIoU of an engine is then its class-balanced
agreement with the source model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.graphs import LogitsModel
from export.parity import normalise
from serve.manifest import sha256
from train.checkpoint import save_weights
from train.config import ConfigError, load_config, save_config
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
    """Write `run_dir` from a transformers SegFormer folder (see the module's docstring); built beside it and
    renamed into place, so a failure leaves no half-written run dir."""
    src, run_dir = Path(src), Path(run_dir)
    found = read_transformers(src)
    if run_dir.exists() and not (run_dir / IMPORTED_FILE).is_file():
        raise CheckpointError(f"{run_dir} exists and is no import: choose another --run")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}-", dir=run_dir.parent))
    try:
        names = found["names"]
        overrides = [f"name={run_dir.name}", "method.preset=independent", "data.format=folder", "data.train_split=val"]
        overrides += [f"data.root={(run_dir / GATE_DIR).resolve()}", f"vit.backbone={found['backbone']}"]
        overrides += [f"vit.decoder_channels={found['decoder_channels']}", f"vit.norm_eps={TRANSFORMERS_EPS}"]
        cfg = load_config(None, overrides)
        cfg.data.num_classes, cfg.data.class_names, cfg.data.palette = len(names), names, palette(len(names))
        student = build_student(cfg.vit, len(names), init=found["weights"]).eval()
        _gate_images(student, tmp / GATE_DIR, images, count, found["size"], cfg.data)
        save_config(cfg, tmp / CONFIG_FILE)
        save_weights(student, weights_file(tmp, "vit"), {"student": "vit", "arch": "segformer", "imported": str(src)})
        provenance = {"format": "transformers", "path": str(src.resolve()), "file": found["weights"].name,
                      "sha256": sha256(found["weights"]), "transformers": found["transformers"],
                      "architecture": found["mit"], "classes": len(names)}  # fmt: skip
        (tmp / IMPORTED_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier import (its engines are rebuilt from this one)
        tmp.rename(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %s, %d classes, serving %dx%d -> %s", src, found["mit"], len(names), *found["size"], run_dir)
    return run_dir


def _gate_images(student, root: Path, images: Path | None, count: int, size: tuple[int, int], data) -> None:
    """A folder dataset of `count` images at the serving size, masked with the student's own class map."""
    h, w = size
    if images is not None:
        files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not files:
            raise CheckpointError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
        pictures = [Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR) for f in files]
    else:
        from train.data.synthetic import generate

        scratch = root.parent / "synthetic"
        generate(scratch, num_train=0, num_val=count, height=h, width=w, seed=0, num_test=0)
        pictures = [Image.open(f).convert("RGB") for f in sorted((scratch / "images").glob("*.png"))]
        shutil.rmtree(scratch)
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    ids, model = [], LogitsModel(student).eval()  # the logits graph's computation: at the input's size
    for i, picture in enumerate(pictures):
        with torch.no_grad():
            logits = model(torch.from_numpy(normalise(np.asarray(picture)[None])))
        ids.append(f"{i:04d}")
        picture.save(root / "images" / f"{ids[-1]}.png")
        Image.fromarray(logits[0].argmax(0).numpy().astype(np.uint8)).save(root / "masks" / f"{ids[-1]}.png")
    (root / "splits" / "val.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "classes.json").write_text(json.dumps({"names": data.class_names, "palette": data.palette}))
