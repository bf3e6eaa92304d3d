"""What decides ONNX Runtime's speed on CUDA: each provider option and each fp16 graph, against eager PyTorch.

python -m benchmarks.ort_cuda --run RUN [--size 1024 2048] [--models cnn vit] [--seconds 1.5] [--images 2]
    [--out RUN/ort-cuda] [--device cuda]

Each student's labels graph (uint8 image in, class map out, built as the export builds it) in three forms:
`fp32`, `fp16` (the export's: only the final resize kept in fp32) and `fp16-fp32-norms` (normalisation, softmax,
reductions and the resize kept in fp32, Cast nodes around each: the export's fp16 graph until this measured it),
each opened with serve's CUDA provider options for its precision plus every option set of OPTION_SETS and timed
end to end at batch 1 (uint8 image on the host in, class map on the host out) beside eager PyTorch fp32 (its
defaults: TF32 convolutions, fp32 matrix products) timed in the same run. Each row (median ms, speed-up over
eager, pixel agreement with eager fp32 on eval images resized to the size) is appended to OUT/rows.jsonl as soon
as it is measured; OUT/report.md at the end. `--device cpu` runs the `default` option set on the CPU provider
(the CPU dry run of the tests).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from benchmarks.bench import TorchRunner, time_it
from export import graphs, precision
from serve.backends import import_onnxruntime
from serve.runtime import OnnxRuntimeEngine, cuda_provider_options
from train.data import build_dataset
from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from train.run_dir import load_run_config, load_student

NORMS = ["LayerNormalization", "BatchNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Resize"]
# graph -> (precision, op types kept fp32; None: the fp32 graph)
GRAPHS = {"fp32": ("fp32", None), "fp16": ("fp16", precision.FP16_KEEP_FP32), "fp16-fp32-norms": ("fp16", NORMS)}
# name -> (CUDA provider options over serve's, whether I/O lives at fixed device addresses: a CUDA graph needs it)
OPTION_SETS = {
    "default": ({}, False),
    "tf32": ({"use_tf32": "1"}, False),  # the fp32 graph as eager PyTorch computes its convolutions
    "nhwc": ({"prefer_nhwc": "1"}, False),
    "cuda-graph": ({"enable_cuda_graph": "1"}, True),
    "heuristic": ({"cudnn_conv_algo_search": "HEURISTIC"}, False),
}


class GraphRunner:
    """A session replaying one CUDA graph: input and output bound once at fixed device addresses, the image
    copied into the same input buffer each call (ONNX Runtime captures the graph on the first runs)."""

    def __init__(self, engine: OnnxRuntimeEngine) -> None:
        self.engine, self.bound = engine, None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        ort = import_onnxruntime()
        images = np.ascontiguousarray(images)
        if self.bound is None:
            x = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type(list(images.shape[:3]), np.uint8, "cuda", 0)
            binding = self.engine.session.io_binding()
            binding.bind_ortvalue_input(self.engine.input_name, x)
            binding.bind_ortvalue_output(self.engine.output_name, y)
            self.bound = (images.shape, x, y, binding)
        shape, x, y, binding = self.bound
        if images.shape != shape:
            raise ValueError(f"a CUDA graph replays one shape: {shape}, not {images.shape}")
        x.update_inplace(images)
        self.engine.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def labels_graphs(student: torch.nn.Module, size: tuple[int, int]) -> dict[str, bytes]:
    """The student's labels graph per GRAPHS entry, serialized (onnxslim'd as the export does)."""
    logits = graphs.simplify(graphs.export_logits(student, size))
    out = {}
    for variant, (_, keep) in GRAPHS.items():
        graph = logits if keep is None else precision.to_fp16(logits, keep)
        out[variant] = graphs.labels_model(graph, IMAGENET_MEAN, IMAGENET_STD).SerializeToString()
    return out


def cast_nodes(model: bytes) -> int:
    return sum(n.op_type == "Cast" for n in onnx.load_from_string(model).graph.node)


def open_runner(model: bytes, device: str, options: dict[str, str], fixed_io: bool):
    engine = OnnxRuntimeEngine(model, device, cuda_options=options)  # options: serve's for the precision, and more
    return (GraphRunner(engine) if fixed_io else engine.run), engine.providers[0]


def eval_images(run_dir: Path, count: int, size: tuple[int, int]) -> np.ndarray:
    cfg = load_run_config(run_dir)
    dataset = build_dataset(cfg.data, cfg.data.eval_split, train=False)
    h, w = size
    return np.stack([np.asarray(Image.fromarray(dataset.read(i)[0]).resize((w, h))) for i in range(count)])


def measure(runner, images: np.ndarray, reference: np.ndarray, seconds: float) -> dict:
    agreement = float(np.mean([(runner(im[None]) == ref).mean() for im, ref in zip(images, reference, strict=True)]))
    timing, first_s = time_it(lambda: runner(images[:1]), 0.3, seconds, 10)
    return {**timing.summary(), "first_call_s": round(first_s, 2), "agreement": agreement}


def student_rows(args, model: str, images: np.ndarray, write) -> list[dict]:
    """Eager PyTorch fp32, then every graph x option set of one student, each row written as it is measured."""
    student = load_student(args.run, model)
    labels = labels_graphs(student, tuple(images.shape[1:3]))  # on the CPU, before the runner moves the student
    device = torch.device(args.device)
    eager = TorchRunner([student], "torch", device)
    reference = np.concatenate([eager(im[None]) for im in images])
    rows = [write({"model": model, "engine": "torch", "options": "eager fp32", **measure(eager, images, reference,
                                                                                      args.seconds)})]  # fmt: skip
    base = rows[0]["p50_ms"]
    ort_device = "cuda" if device.type == "cuda" else "cpu"
    sets = OPTION_SETS if ort_device == "cuda" else {"default": OPTION_SETS["default"]}
    for variant, graph in labels.items():
        casts = cast_nodes(graph)  # parsed once per graph, not per option set
        for name, (extra, fixed_io) in sets.items():
            row = {"model": model, "engine": f"ort.{ort_device}.{variant}", "options": name, "casts": casts}
            try:
                options = cuda_provider_options(GRAPHS[variant][0], extra)
                runner, row["provider"] = open_runner(graph, ort_device, options, fixed_io)
                row.update(measure(runner, images, reference, args.seconds), status="ok")
                row["speedup"] = base / row["p50_ms"]
            except Exception as e:  # an option this build or graph refuses: the row says so, the rest go on
                row.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rows.append(write(row))
    return rows


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# ONNX Runtime on {meta['device']}: options and fp16 graphs at {meta['size']}, batch 1", "",
             f"onnxruntime {meta['onnxruntime']}, torch {meta['torch']}; p50 ms end to end (uint8 in, class map out); "
             "speed-up over eager PyTorch fp32 measured in the same run; agreement: share of pixels whose class "
             f"equals eager fp32's on {meta['images']} eval images.", "",
             "| model | engine | options | Cast nodes | p50 ms | speed-up | agreement % | status |",
             "|---|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        ok = r.get("status", "ok") == "ok"
        ms = f"{r['p50_ms']:.2f}" if ok else ""
        speedup = f"{r['speedup']:.2f}×" if ok and "speedup" in r else ""
        agree = f"{100 * r['agreement']:.3f}" if ok else ""
        status = "ok" if ok else r["error"]
        lines.append(f"| {r['model']} | {r['engine']} | {r['options']} | {r.get('casts', '')} | {ms} | {speedup} | "
                     f"{agree} | {status} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ort_cuda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit"])
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--seconds", type=float, default=1.5, help="timing budget per row")
    parser.add_argument("--images", type=int, default=2, help="eval images the agreement is measured on")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or args.run / "ort-cuda"
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "rows.jsonl"
    rows_file.write_text("")
    ort = import_onnxruntime()
    cuda = args.device == "cuda"
    meta = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "onnxruntime": ort.__version__, "torch": torch.__version__, "size": "x".join(map(str, args.size)),
            "images": args.images, "serve_cuda_options": cuda_provider_options()}  # fmt: skip

    def write(row: dict) -> dict:
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    write({"meta": meta})
    images = eval_images(args.run, args.images, tuple(args.size))
    rows = [r for model in args.models for r in student_rows(args, model, images, write)]
    (out / "report.md").write_text(report(rows, meta))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
