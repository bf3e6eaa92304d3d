"""A Triton Inference Server model repository from a run's engine dirs.

python -m export.triton --run runs/<name> [--out RUN/triton] [--io labels logits] [--variants ...]
    [--instances 1] [--cpu] [--queue-delay-us 100] [--tensorrt RELEASE] [--python-backend]

One Triton model per engine: `<student>_<variant>[_logits][_trt]/config.pbtxt` and
`<model>/1/model.onnx` (platform onnxruntime_onnx) or `model.plan` (tensorrt_plan). Batch is
Triton's (max_batch_size from the manifest, dims without it), height and width are -1, requests
of equal shape are batched dynamically. Everything comes from the manifests: no torch here.

The ensemble of the two students is a Triton ensemble, `ensemble_<variant>[_trt]`, wherever both
students' logits models of a variant are in the repository: `ensemble_preprocess` (uint8 NHWC to
normalised NCHW, an ONNX graph written here), both logits models, then `ensemble_combine` (the mean of
their softmax, argmax: another small ONNX graph). Its input and output are the labels models'.

The int8.qdq ONNX graph is TensorRT's input (ONNX Runtime on a GPU runs its Q/DQ pairs as fake
quantization, slower than fp32): on GPU its plan serves it, and only `--cpu` repositories hold it.
A plan runs only on the TensorRT release and GPU it was built for: `--tensorrt RELEASE` (the
server's, e.g. 10.16.0) leaves out plans built for another one.

`--python-backend` serves each ONNX file through Triton's Python backend (`serve/triton_onnx_model.py`
running it with ONNX Runtime) instead of the onnxruntime_onnx platform: for a server without Triton's
ONNX Runtime backend, like PyTriton's (`make serve-triton ARGS="--repository RUN/triton"`). No plans.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from export.tensorrt import tensorrt_here
from serve.manifest import IO_SPECS, EngineEntry, Manifest, ManifestError, read_manifest
from serve.segmenter import STUDENTS, engine_dirs

log = logging.getLogger(__name__)

TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
PYTHON_MODEL = Path(__file__).resolve().parents[1] / "serve" / "triton_onnx_model.py"
PREPROCESS, COMBINE = "ensemble_preprocess", "ensemble_combine"
NORMALISED = "normalised"  # preprocess's output: the logits engines' input
OPSET = 18


def model_name(student: str, entry: EngineEntry) -> str:
    parts = [student, entry.variant.replace(".", "_")]
    if entry.io == "logits":
        parts.append("logits")
    if entry.format == "plan":
        parts.append("trt")
    return "_".join(parts)


def tensor_dims(manifest: Manifest, io: str, which: str, hw: tuple[int, int] = (-1, -1)) -> list[int]:
    """Dims without the batch: labels NHWC in / NHW out; logits NCHW in / N,classes,H,W out; any height and width,
    or `hw` (an engine the gate passed at one size only)."""
    h, w = hw
    if io == "labels":
        return [h, w, 3] if which == "input" else [h, w]
    return [3, h, w] if which == "input" else [manifest.num_classes, h, w]


def tensors_pbtxt(which: str, tensors: list[tuple[str, str, list[int]]]) -> list[str]:
    """`input [...]` or `output [...]` from (name, TYPE_*, dims without the batch)."""
    blocks = [
        f'  {{ name: "{n}", data_type: {t}, dims: [ {", ".join(str(d) for d in dims)} ] }}' for n, t, dims in tensors
    ]
    return [f"{which} [", ",\n".join(blocks), "]"]


@dataclass(frozen=True)
class RepositoryOptions:
    io: tuple[str, ...] = ("labels", "logits")  # logits: the ensemble's members too
    variants: tuple[str, ...] = ()  # empty: every variant exported
    instances: int = 1  # model instances per device
    cpu_only: bool = False  # every ONNX model on KIND_CPU; no plans
    delay_us: int = 100  # dynamic batching's wait for more requests
    tensorrt: str | None = None  # the server's TensorRT release: plans built for another are left out
    compute_capability: str | None = None  # the server GPU's: plans built for another architecture are left out
    python_backend: bool = False  # ONNX files run by ONNX Runtime in Triton's Python backend


class Repository:
    """A model repository being written into a staging dir: each model's config and version dir."""

    def __init__(self, staged: Path, opts: RepositoryOptions) -> None:
        self.staged, self.opts, self.names = staged, opts, []

    def runtime(self, fmt: str) -> str:
        """The config's `platform: ...` or `backend: ...` line."""
        if self.opts.python_backend:
            return 'backend: "python"'
        platform, filename = PLATFORMS[fmt]
        return f'platform: "{platform}"\ndefault_model_filename: "{filename}"'

    def config(self, name: str, fmt: str, max_batch: int, inputs: list, outputs: list, kind: str) -> str:
        """An ONNX or plan model's config; inputs and outputs as (name, TYPE_*, dims without the batch)."""
        lines = [f'name: "{name}"', self.runtime(fmt), f"max_batch_size: {max_batch}"]
        lines += tensors_pbtxt("input", inputs) + tensors_pbtxt("output", outputs)
        lines += [
            f"dynamic_batching {{ max_queue_delay_microseconds: {self.opts.delay_us} }}",
            f"instance_group [ {{ count: {self.opts.instances}, kind: {kind} }} ]",
        ]
        return "\n".join(lines) + "\n"

    def write(self, name: str, config: str, source: Path | onnx.ModelProto | None = None, fmt: str = "onnx") -> None:
        """`<name>/config.pbtxt` and version 1 with the model file (an ensemble has none, but the dir)."""
        version = self.staged / name / "1"
        version.mkdir(parents=True)
        if isinstance(source, onnx.ModelProto):
            onnx.save(source, version / PLATFORMS[fmt][1])
        elif source is not None:
            shutil.copyfile(source, version / PLATFORMS[fmt][1])
            external = source.with_name(f"{source.name}.data")
            if external.is_file():  # weights over 2 GB live beside the graph under the name it records
                shutil.copyfile(external, version / external.name)
        if source is not None and self.opts.python_backend:
            shutil.copyfile(PYTHON_MODEL, version / "model.py")
        (self.staged / name / "config.pbtxt").write_text(config)
        self.names.append(name)


def engine_tensors(manifest: Manifest, io: str, which: str, hw: tuple[int, int] = (-1, -1)) -> list[tuple]:
    t = IO_SPECS[io][which]
    return [(t["name"], TRITON_TYPES[t["dtype"]], tensor_dims(manifest, io, which, hw))]


def preprocess_graph(manifest: Manifest) -> onnx.ModelProto:
    """uint8 RGB [N, H, W, 3] to the logits engines' input: (x - mean) / std as float [N, 3, H, W]."""
    scale = manifest.preprocess.get("scale", 255)
    mean = [m * scale for m in manifest.preprocess["mean"]]
    std = [s * scale for s in manifest.preprocess["std"]]
    image = IO_SPECS["labels"]["input"]["name"]
    nodes = [
        helper.make_node("Cast", [image], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["x", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["nhwc"]),
        helper.make_node("Transpose", ["nhwc"], [NORMALISED], perm=[0, 3, 1, 2]),
    ]
    constants = [
        helper.make_tensor("mean", TensorProto.FLOAT, [3], mean),
        helper.make_tensor("std", TensorProto.FLOAT, [3], std),
    ]
    graph = helper.make_graph(
        nodes, PREPROCESS,
        [helper.make_tensor_value_info(image, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(NORMALISED, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=constants,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def combine_graph(num_classes: int) -> onnx.ModelProto:
    """Both students' logits [N, C, H, W] to the class map [N, H, W] uint8: argmax of their mean softmax
    (the sum has the same argmax), as the local segmenter's ensemble computes it."""
    labels = IO_SPECS["labels"]["output"]["name"]
    nodes = [helper.make_node("Softmax", [s], [f"{s}_p"], axis=1) for s in STUDENTS]
    nodes += [
        helper.make_node("Add", [f"{s}_p" for s in STUDENTS], ["p"]),
        helper.make_node("ArgMax", ["p"], ["index"], axis=1, keepdims=0),
        helper.make_node("Cast", ["index"], [labels], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, COMBINE,
        [helper.make_tensor_value_info(s, TensorProto.FLOAT, ["N", num_classes, "H", "W"]) for s in STUDENTS],
        [helper.make_tensor_value_info(labels, TensorProto.UINT8, ["N", "H", "W"])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def ensemble_pbtxt(name: str, members: dict[str, str], max_batch: int, inputs: list, outputs: list) -> str:
    """Triton's ensemble scheduler: preprocess, both students' logits models, combine (no backend of its own);
    its `inputs` and `outputs` are the labels models'."""
    image, labels = (IO_SPECS["labels"][w]["name"] for w in ("input", "output"))
    normalised, logits = (IO_SPECS["logits"][w]["name"] for w in ("input", "output"))

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = [f'input_map {{ key: "{k}", value: "{v}" }}' for k, v in inputs.items()]
        maps += [f'output_map {{ key: "{k}", value: "{v}" }}' for k, v in outputs.items()]
        return f'    {{ model_name: "{model}", model_version: -1, {", ".join(maps)} }}'

    steps = [step(PREPROCESS, {image: image}, {NORMALISED: NORMALISED})]
    steps += [step(members[s], {normalised: NORMALISED}, {logits: f"{s}_logits"}) for s in STUDENTS]
    steps.append(step(COMBINE, {s: f"{s}_logits" for s in STUDENTS}, {labels: labels}))
    lines = [f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {max_batch}"]
    lines += tensors_pbtxt("input", inputs) + tensors_pbtxt("output", outputs)
    lines += ["ensemble_scheduling {", "  step [", ",\n".join(steps), "  ]", "}"]
    return "\n".join(lines) + "\n"


def shipped(student: str, entry: EngineEntry, opts: RepositoryOptions) -> bool:
    """Whether an engine gets a Triton model (and why not, in the log)."""
    if entry.io not in opts.io or (opts.variants and entry.variant not in opts.variants):
        return False
    if entry.format == "plan" and (opts.cpu_only or opts.python_backend):  # plans need Triton's TensorRT backend
        return False
    if entry.runtime == "openvino":  # its ONNX file is served by the onnxruntime_onnx model of that variant
        log.info(
            "%s/%s: OpenVINO %s left out (Triton's OpenVINO backend reads IR)", student, entry.file, entry.precision
        )
        return False
    if entry.format == "onnx" and entry.device == "cuda" and not opts.cpu_only:
        log.info("%s/%s: left out, TensorRT's graph (its plan serves it on GPU)", student, entry.file)
        return False
    if entry.format == "plan":
        built = entry.tensorrt or {}
        if opts.tensorrt and built.get("version") != opts.tensorrt:
            release = opts.tensorrt
            log.warning(
                "%s/%s: left out, built for TensorRT %s, the server runs %s (python -m export.tensorrt "
                "with TensorRT %s rebuilds it)", student, entry.file, built.get("version"), release, release,
            )  # fmt: skip
            return False
        if opts.compute_capability and built.get("compute_capability") != opts.compute_capability:
            log.warning(
                "%s/%s: left out, built for a %s (compute %s), the server's GPU is compute %s (python -m "
                "export.tensorrt on the server's GPU rebuilds it)", student, entry.file, built.get("gpu"),
                built.get("compute_capability"), opts.compute_capability,
            )  # fmt: skip
            return False
        log.info(
            "%s/%s: runs only on TensorRT %s and a %s (compute %s)",
            student, entry.file, built.get("version"), built.get("gpu"), built.get("compute_capability"),
        )  # fmt: skip
    return True


def write_repository(engines_root: Path, out: Path, opts: RepositoryOptions = RepositoryOptions()) -> list[str]:
    """Write (replacing) the repository; returns the model names."""
    staged = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    repo = Repository(staged, opts)
    manifests = {student: read_manifest(d) for student, d in engine_dirs(engines_root).items()}
    logits_models = _engine_models(repo, engines_root, manifests)
    _ensembles(repo, manifests, logits_models)
    if not repo.names:
        shutil.rmtree(staged, ignore_errors=True)
        raise ManifestError(f"{engines_root}: no engine matches io={list(opts.io)} variants={opts.variants or 'all'}")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return repo.names


def _engine_models(repo: Repository, engines_root: Path, manifests: dict[str, Manifest]) -> dict:
    """One model per shipped engine; returns the logits models by (variant, format): {student: model}."""
    logits_models: dict[tuple[str, str], dict[str, str]] = {}
    for student, manifest in manifests.items():
        for entry in manifest.engines:
            if not shipped(student, entry, repo.opts):
                continue
            kind = "KIND_CPU" if repo.opts.cpu_only or entry.device == "cpu" else "KIND_GPU"
            name = model_name(student, entry)
            hw = tuple(entry.profile["opt"][1:]) if entry.profile else (-1, -1)  # Triton refuses other sizes
            ios = [engine_tensors(manifest, entry.io, which, hw) for which in ("input", "output")]
            config = repo.config(name, entry.format, manifest.shapes["max"][0], *ios, kind)
            repo.write(name, config, Path(engines_root) / student / entry.file, entry.format)
            if entry.io == "logits" and not entry.profile:  # an ensemble takes any size
                logits_models.setdefault((entry.variant, entry.format), {})[student] = name
    return logits_models


def _ensembles(repo: Repository, manifests: dict[str, Manifest], logits_models: dict) -> None:
    """A Triton ensemble per variant whose logits models both students have (with the two graphs around them)."""
    pairs = {key: members for key, members in logits_models.items() if set(members) == set(STUDENTS)}
    if not pairs:
        return
    first, *others = (manifests[s] for s in STUDENTS)
    if any(m.preprocess != first.preprocess or m.classes != first.classes for m in others):
        log.warning("no ensemble: the students differ in normalisation or classes")
        return
    max_batch = min(manifests[s].shapes["max"][0] for s in STUDENTS)
    kind = "KIND_CPU" if repo.opts.cpu_only else "KIND_GPU"
    uint8_in = engine_tensors(first, "labels", "input")
    normalised = [(NORMALISED, "TYPE_FP32", tensor_dims(first, "logits", "input"))]
    logits = [(s, "TYPE_FP32", tensor_dims(first, "logits", "output")) for s in STUDENTS]
    labels_out = engine_tensors(first, "labels", "output")
    repo.write(
        PREPROCESS, repo.config(PREPROCESS, "onnx", max_batch, uint8_in, normalised, kind), preprocess_graph(first)
    )
    repo.write(
        COMBINE, repo.config(COMBINE, "onnx", max_batch, logits, labels_out, kind), combine_graph(first.num_classes)
    )
    for (variant, fmt), members in sorted(pairs.items()):
        name = "_".join(["ensemble", variant.replace(".", "_"), *(["trt"] if fmt == "plan" else [])])
        # Triton wants a version dir, even an empty one
        repo.write(name, ensemble_pbtxt(name, members, max_batch, uint8_in, labels_out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN/triton")
    parser.add_argument(
        "--io", nargs="+", default=["labels", "logits"], choices=list(IO_SPECS), help="logits: the ensemble's too"
    )
    parser.add_argument("--variants", nargs="+", help="default: every variant exported")
    parser.add_argument("--instances", type=int, default=1, help="model instances per device")
    parser.add_argument("--cpu", action="store_true", help="every ONNX model on KIND_CPU; no plans")
    parser.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching wait")
    parser.add_argument(
        "--tensorrt", metavar="RELEASE", help="the server's TensorRT (default: this host's): other plans left out"
    )
    parser.add_argument(
        "--compute-capability", metavar="CC", help="the server GPU's (default: this host's): other plans left out"
    )
    parser.add_argument(
        "--python-backend", action="store_true", help="ONNX files run by ONNX Runtime in Triton's Python backend"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out or args.run / "triton"
    try:
        release, cc = args.tensorrt, args.compute_capability
        if not (args.cpu or args.python_backend) and None in (release, cc):
            here = tensorrt_here()  # the repository is served on this host unless told otherwise
            release, cc = release or (here and here.version), cc or (here and here.compute_capability)
            log.info("plans checked against TensorRT %s and compute capability %s", release, cc)
        opts = RepositoryOptions(
            tuple(args.io), tuple(args.variants or ()), args.instances, args.cpu, args.queue_delay_us, release, cc,
            args.python_backend,
        )  # fmt: skip
        names = write_repository(args.run / "export", out, opts)
    except (FileNotFoundError, ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(names)} models in {out}: {', '.join(names)}")
    if args.python_backend:
        print(f'make serve-triton RUN={args.run} ARGS="--repository {out}"')
    else:
        print(f"tritonserver --model-repository {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
