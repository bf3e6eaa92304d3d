"""A Triton Inference Server model repository from a run's engine dirs.

python -m export.triton --run runs/<name> [--out RUN/triton] [--io labels logits] [--variants ...]
    [--instances 1] [--cpu] [--queue-delay-us 100]

One Triton model per engine: `<student>_<variant>[_logits][_trt]/config.pbtxt` and
`<model>/1/model.onnx` (platform onnxruntime_onnx) or `model.plan` (tensorrt_plan). Batch is
Triton's (max_batch_size from the manifest, dims without it), height and width are -1, requests
of equal shape are batched dynamically. Everything comes from the manifests: no torch here.

The int8.qdq ONNX graph is TensorRT's input (ONNX Runtime on a GPU runs its Q/DQ pairs as fake
quantization, slower than fp32): on GPU its plan serves it, and only `--cpu` repositories hold it.
A plan runs only on the TensorRT release and GPU it was built for: `--tensorrt RELEASE` (the
server's, e.g. 10.16.0) leaves out plans built for another one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from serve.manifest import IO_SPECS, EngineEntry, Manifest, ManifestError, read_manifest
from serve.segmenter import engine_dirs

log = logging.getLogger(__name__)

TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}


def model_name(student: str, entry: EngineEntry) -> str:
    parts = [student, entry.variant.replace(".", "_")]
    if entry.io == "logits":
        parts.append("logits")
    if entry.format == "plan":
        parts.append("trt")
    return "_".join(parts)


def tensor_dims(manifest: Manifest, io: str, which: str) -> list[int]:
    """Dims without the batch: labels NHWC in / NHW out; logits NCHW in / N,classes,H,W out."""
    if io == "labels":
        return [-1, -1, 3] if which == "input" else [-1, -1]
    return [3, -1, -1] if which == "input" else [manifest.num_classes, -1, -1]


def config_pbtxt(name: str, manifest: Manifest, entry: EngineEntry, kind: str, instances: int, delay_us: int) -> str:
    platform, filename = PLATFORMS[entry.format]
    spec = IO_SPECS[entry.io]
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {manifest.shapes['max'][0]}",
        f'default_model_filename: "{filename}"',
    ]
    for which in ("input", "output"):
        t = spec[which]
        dims = ", ".join(str(d) for d in tensor_dims(manifest, entry.io, which))
        lines += [
            f"{which} [",
            "  {",
            f'    name: "{t["name"]}"',
            f"    data_type: {TRITON_TYPES[t['dtype']]}",
            f"    dims: [ {dims} ]",
            "  }",
            "]",
        ]
    lines += [
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}",
        f"instance_group [ {{ count: {instances}, kind: {kind} }} ]",
    ]
    return "\n".join(lines) + "\n"


def write_repository(
    engines_root: Path,
    out: Path,
    io: tuple[str, ...] = ("labels",),
    variants: tuple[str, ...] | None = None,
    instances: int = 1,
    cpu_only: bool = False,
    delay_us: int = 100,
    tensorrt: str | None = None,
) -> list[str]:
    """Write (replacing) the repository; returns the model names."""
    staged = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    names = []
    for student, engine_dir in engine_dirs(engines_root).items():
        manifest = read_manifest(engine_dir)
        for entry in manifest.engines:
            if entry.io not in io or (variants and entry.variant not in variants):
                continue
            if cpu_only and entry.format == "plan":
                continue
            if entry.format == "openvino":  # its ONNX file is served by the onnxruntime_onnx model of that variant
                log.info(
                    "%s/%s: OpenVINO %s left out (Triton's OpenVINO backend reads IR)",
                    student,
                    entry.file,
                    entry.variant,
                )
                continue
            if entry.format == "onnx" and entry.target == "tensorrt" and not cpu_only:
                log.info("%s/%s: left out, TensorRT's graph (its plan serves it on GPU)", student, entry.file)
                continue
            if entry.format == "plan":
                built = entry.tensorrt or {}
                if tensorrt and built.get("version") != tensorrt:
                    log.warning(
                        "%s/%s: left out, built for TensorRT %s, the server runs %s (python -m export.tensorrt "
                        "with TensorRT %s rebuilds it)", student, entry.file, built.get("version"), tensorrt, tensorrt,
                    )  # fmt: skip
                    continue
                log.info(
                    "%s/%s: runs only on TensorRT %s and a %s (compute %s)",
                    student, entry.file, built.get("version"), built.get("gpu"), built.get("compute_capability"),
                )  # fmt: skip
            kind = "KIND_CPU" if cpu_only or entry.target == "cpu" else "KIND_GPU"
            name = model_name(student, entry)
            version = staged / name / "1"
            version.mkdir(parents=True)
            target = version / PLATFORMS[entry.format][1]
            shutil.copyfile(engine_dir / entry.file, target)
            external = engine_dir / f"{entry.file}.data"
            if external.is_file():  # weights over 2 GB live beside the graph under the name it records
                shutil.copyfile(external, version / external.name)
            text = config_pbtxt(name, manifest, entry, kind, instances, delay_us)
            (staged / name / "config.pbtxt").write_text(text)
            names.append(name)
    if not names:
        shutil.rmtree(staged, ignore_errors=True)
        raise ManifestError(f"{engines_root}: no engine matches io={list(io)} variants={variants or 'all'}")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.triton", description=__doc__)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN/triton")
    parser.add_argument("--io", nargs="+", default=["labels"], choices=list(IO_SPECS))
    parser.add_argument("--variants", nargs="+", help="default: every variant exported")
    parser.add_argument("--instances", type=int, default=1, help="model instances per device")
    parser.add_argument("--cpu", action="store_true", help="every ONNX model on KIND_CPU; no plans")
    parser.add_argument("--queue-delay-us", type=int, default=100, help="dynamic batching wait")
    parser.add_argument(
        "--tensorrt", metavar="RELEASE", help="the server's TensorRT (e.g. 10.16.0): other plans left out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out or args.run / "triton"
    try:
        names = write_repository(
            args.run / "export", out, tuple(args.io), tuple(args.variants or ()), args.instances, args.cpu,
            args.queue_delay_us, args.tensorrt,
        )  # fmt: skip
    except (FileNotFoundError, ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(names)} models in {out}: {', '.join(names)}")
    print(f"tritonserver --model-repository {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
