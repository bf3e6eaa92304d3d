"""ONNX graphs of a student in its two I/O modes.

`logits`: float NCHW normalised image -> float logits at the input size (torch.onnx dynamo export).
`labels`: uint8 NHWC RGB -> uint8 class map. Built by wrapping the logits graph in two small ONNX
graphs (cast + layout + normalisation before it, argmax + cast after it) rather than exporting a
second time, so every precision variant of the logits graph gets its labels twin for free.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18  # the dynamo exporter's floor; LayerNormalization is one op since 17
MAX_INLINE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin: larger weights go to .onnx.data
CACHE_ENV = "SEGDEPLOY_CACHE"  # where traced graphs are kept between exports; "off": nowhere
CACHE_ENTRIES = 8  # the newest traces kept
TRACED_CODE = ("train/models", "export/graphs.py")  # the source a trace depends on, besides torch and timm


class LogitsModel(nn.Module):
    """What the `logits` graph computes: the student's logits, bilinearly resized to the input size
    (training-only parts such as the HFD projectors live outside the student and never get here)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.student(image).logits
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def export_logits(student: nn.Module, sample_hw: tuple[int, int], opset: int = OPSET) -> onnx.ModelProto:
    """Trace with batch 2 (torch.export specialises size-1 dims) and mark batch, height, width dynamic
    (symbolic in the graph: the engines' own limits live in the manifest's profile).

    The trace size keeps every stage at least 2x2 (a 1-sized stage would be specialised too) and
    height != width (equal sizes would be assumed equal forever)."""
    model = LogitsModel(student).eval()
    h, w = max(sample_hw[0], 64), max(sample_hw[1], 64)
    if h == w:
        w += 32
    sample = torch.randn(2, 3, h, w)
    dims = {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=32, max=8192),
        3: torch.export.Dim("width", min=32, max=8192),
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample,),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"image": dims},
            verbose=False,
        )
    return program.model_proto


def trace_cache() -> Path | None:
    """$SEGDEPLOY_CACHE/traces, else ~/.cache/segdeploy/traces (XDG_CACHE_HOME honoured); None when "off"."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segdeploy"
    return None if str(root) == "off" else Path(root) / "traces"


def trace_key(identity: str, sample_hw: tuple[int, int], opset: int) -> str:
    """What a trace depends on: the student (`identity`: its weights' sha256 and config), the trace's
    settings, torch's and timm's versions and this project's model code."""
    import timm

    repo = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(repr((identity, tuple(sample_hw), opset, torch.__version__)).encode())
    digest.update(timm.__version__.encode())
    for part in TRACED_CODE:
        for source in sorted((repo / part).rglob("*.py")) if (repo / part).is_dir() else [repo / part]:
            digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def cached_logits(
    student: nn.Module, identity: str, sample_hw: tuple[int, int], opset: int = OPSET
) -> tuple[onnx.ModelProto, bool]:
    """`export_logits`, or the graph an earlier export of the same student traced (a trace is most of an
    export's time, and a re-export after a kill, a new variant or a new gate setting traces the same graph);
    True when it came from the cache. The parity gate checks a cached graph like a fresh one."""
    cache = trace_cache()
    path = cache / f"{trace_key(identity, sample_hw, opset)}.onnx" if cache else None
    if path is not None and path.is_file():
        try:
            model = onnx.load(str(path))
            path.touch()  # newest first when the cache is pruned
            return model, True
        except Exception as e:  # a damaged entry is traced again
            log.warning("%s: unreadable cached trace (%s), tracing again", path, e)
    model = export_logits(student, sample_hw, opset)
    if path is not None and model.ByteSize() <= MAX_INLINE_BYTES:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(f".{os.getpid()}.part")
            onnx.save_model(model, str(part))
            os.replace(part, path)  # whole or absent, whichever process writes it
            for old in sorted(path.parent.glob("*.onnx"), key=lambda f: f.stat().st_mtime)[:-CACHE_ENTRIES]:
                old.unlink(missing_ok=True)
        except OSError as e:  # a full or read-only cache costs the next export a trace, nothing more
            log.warning("%s: trace not cached (%s)", path, e)
    return model, False


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def labels_model(logits: onnx.ModelProto, mean: list[float], std: list[float]) -> onnx.ModelProto:
    """uint8 NHWC in, uint8 class map out: the normalisation of training (x - 255 mean) / (255 std),
    then the logits graph, then argmax over classes."""
    opset = [helper.make_opsetid("", opset_of(logits))]
    n, h, w = "batch", "height", "width"
    pre = helper.make_graph(
        [
            helper.make_node("Cast", ["pixels"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["as_float"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Sub", ["nchw", "mean255"], ["centred"]),
            helper.make_node("Mul", ["centred", "inv_std255"], ["normalised"]),
        ],
        "preprocess",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [n, h, w, 3])],
        [helper.make_tensor_value_info("normalised", TensorProto.FLOAT, [n, 3, h, w])],
        initializer=[
            _const("mean255", np.asarray(mean, np.float32) * 255),
            _const("inv_std255", 1.0 / (np.asarray(std, np.float32) * 255)),
        ],
    )
    k = logits.graph.output[0].type.tensor_type.shape.dim[1]
    post = helper.make_graph(
        [
            helper.make_node("ArgMax", ["scores"], ["index"], axis=1, keepdims=0),
            # TensorRT casts to UINT8 only from FP32/FP16, never from ArgMax's INT64: through float,
            # exact for class ids < 2^24 (and a uint8 map holds < 256 anyway).
            helper.make_node("Cast", ["index"], ["index_float"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["index_float"], ["labels"], to=TensorProto.UINT8),
        ],
        "postprocess",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n, k.dim_value or "classes", h, w])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, [n, h, w])],
    )
    ir = logits.ir_version
    pre_model = helper.make_model(pre, opset_imports=opset, ir_version=ir)
    post_model = helper.make_model(post, opset_imports=opset, ir_version=ir)
    body = onnx.compose.add_prefix(logits, "model/")
    merged = onnx.compose.merge_models(pre_model, body, io_map=[("normalised", "model/image")])
    merged = onnx.compose.merge_models(merged, post_model, io_map=[("model/logits", "scores")])
    _rename(merged, "pixels", "image")
    merged.graph.name = f"{logits.graph.name or 'student'}_labels"
    return merged


STEPS = {"zero": 0, "two": 2, "four": 4}  # source_logits' Slice bounds (opset 11 has no Shape start/end)


def source_logits(
    source: onnx.ModelProto, image: str, output: str, layout: str, scale: np.ndarray, shift: np.ndarray, resize: bool
) -> onnx.ModelProto:
    """Another project's segmentation graph in this project's `logits` contract: the normalised NCHW `image`
    (ImageNet's normalisation) is mapped to the source's own (x * scale + shift per channel) and layout, the
    source runs, and its `output` (N x C x h x w) is resized bilinearly to the input size where its stride is
    not 1 (`resize`), as LogitsModel does for the students."""
    inner = onnx.compose.add_prefix(source, "source/")
    graph, feed, scores = inner.graph, f"source/{image}", f"source/{output}"
    given = next(i for i in graph.input if i.name == feed)
    dims = [d.dim_value or d.dim_param or "?" for d in given.type.tensor_type.shape.dim]
    nchw = dims if layout == "nchw" else [dims[0], dims[3], dims[1], dims[2]]
    k = next(o for o in graph.output if o.name == scores).type.tensor_type.shape.dim[1]
    pre = [
        helper.make_node("Mul", ["image", "source_scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "source_shift"], ["renormalised"]),
        helper.make_node("Transpose", ["renormalised"], [feed], perm=[0, 2, 3, 1])
        if layout == "nhwc"
        else helper.make_node("Identity", ["renormalised"], [feed]),
    ]
    post = [helper.make_node("Identity", [scores], ["logits"])]
    if resize:
        post = [
            helper.make_node("Shape", ["image"], ["image_shape"]),
            helper.make_node("Slice", ["image_shape", "two", "four"], ["image_hw"]),
            helper.make_node("Shape", [scores], ["scores_shape"]),
            helper.make_node("Slice", ["scores_shape", "zero", "two"], ["scores_nc"]),
            helper.make_node("Concat", ["scores_nc", "image_hw"], ["logits_size"], axis=0),
            helper.make_node(
                "Resize",
                [scores, "", "", "logits_size"],
                ["logits"],
                coordinate_transformation_mode="half_pixel",
                mode="linear",
            ),
        ]
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([_const("source_scale", scale), _const("source_shift", shift)])
    graph.initializer.extend(onnx.numpy_helper.from_array(np.array([v], np.int64), n) for n, v in STEPS.items())
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", TensorProto.FLOAT, nchw))
    del graph.output[:]
    k = k.dim_value or "classes"
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [nchw[0], k, nchw[2], nchw[3]]))
    graph.name = f"{source.graph.name or 'source'}_logits"
    return inner


def _const(name: str, values: np.ndarray) -> TensorProto:
    return onnx.numpy_helper.from_array(values.reshape(1, 3, 1, 1).astype(np.float32), name)


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    for value in model.graph.input:
        if value.name == old:
            value.name = new


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (the maintained simplifier Ultralytics switched to); the caller re-checks parity."""
    import onnxslim

    return onnxslim.slim(model)


def with_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` whose metadata_props are exactly `metadata` (the original is shared between
    the engines derived from it)."""
    stamped = onnx.ModelProto()
    stamped.CopyFrom(model)
    del stamped.metadata_props[:]
    onnx.helper.set_model_props(stamped, metadata)
    return stamped


def save(model: onnx.ModelProto, path: Path, check: bool = True) -> None:
    """Check with full shape inference (unless told not to: a graph made elsewhere is kept as it is), then save;
    weights inline unless they exceed protobuf's limit."""
    if check:
        onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    external = model.ByteSize() > MAX_INLINE_BYTES
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )
