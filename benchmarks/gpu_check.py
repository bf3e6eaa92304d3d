"""What a GPU host without TensorRT can verify of the GPU path, in one go (benchmarks/gpu.sh runs it).

python -m benchmarks.gpu_check --run runs/<name> --out OUT [--size 1024 2048] [--images 4] [--device cuda]

- env.json: the GPU, its compute capability, driver, memory, the CUDA and cuDNN of torch.
- Precision agreement of both students, the parity gate's proxy: the argmax of TF32 (matmuls and
  convolutions), fp16 and bf16 against strict fp32, on eval images resized to --size. TensorRT's fp32
  plans are built without TF32 because this agreement can fall under the gate's 99.9 %.
- Peak memory at the largest profile: the manifest's max shape (or what `export` would choose at
  --size), one forward pass per student in fp32 and fp16, as an upper bound of what an engine's
  activations need.
Writes OUT/gpu-check.json and OUT/gpu-check.md. On a CPU (--device cpu) the same code runs with the
CUDA-only rows marked n/a, which is how the tests check it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from export.pipeline import profile_shapes
from serve.manifest import ManifestError, read_manifest
from train.data import build_dataset
from train.metrics import class_map
from train.run_dir import load_run_config, load_students

MODES = ("fp32", "tf32", "fp16", "bf16")


def probe(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type != "cuda":
        return {**env, "gpu": None}
    props = torch.cuda.get_device_properties(device)
    env.update(
        gpu=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 1),
        cudnn=torch.backends.cudnn.version(),
    )
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["driver"] = None
    return env


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


@torch.no_grad()
def predict(model, images: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor | None:
    """Class maps at input size in one precision mode; None where the device has no such mode."""
    if mode == "tf32" and device.type != "cuda":
        return None
    if mode == "fp16" and device.type != "cuda":
        return None  # CPU fp16 convolutions are emulated, not a deployment precision
    _set_tf32(mode == "tf32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(images).logits.float()
    _set_tf32(False)
    return class_map(F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False))


def agreement(students: dict, images: torch.Tensor, device: torch.device) -> dict:
    rows = {}
    for name, model in students.items():
        reference = predict(model, images, "fp32", device)
        rows[name] = {}
        for mode in MODES[1:]:
            labels = predict(model, images, mode, device)
            rows[name][mode] = None if labels is None else float((labels == reference).float().mean())
    return rows


@torch.no_grad()
def peak_memory(students: dict, shape: list[int], device: torch.device) -> dict:
    """GiB at the profile's max [batch, H, W], fp32 and fp16 autocast, per student (CUDA only)."""
    if device.type != "cuda":
        return {name: {"fp32": None, "fp16": None} for name in students}
    batch, h, w = shape
    out = {}
    for name, model in students.items():
        out[name] = {}
        for mode in ("fp32", "fp16"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            x = torch.randn(batch, 3, h, w, device=device)
            try:
                with torch.autocast("cuda", dtype=torch.float16, enabled=mode == "fp16"):
                    model(x)
                torch.cuda.synchronize(device)
                out[name][mode] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            except torch.cuda.OutOfMemoryError:
                out[name][mode] = "out of memory"
            del x
    return out


def eval_images(run_dir: Path, size: tuple[int, int], count: int) -> torch.Tensor:
    cfg = load_run_config(run_dir)
    dataset = build_dataset(cfg.data, cfg.data.eval_split, train=False)
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def largest_profile(run_dir: Path, size: tuple[int, int], num_classes: int) -> tuple[list[int], str]:
    try:
        shapes = read_manifest(run_dir / "export" / "cnn").shapes
        if shapes["opt"][1:] == list(size):
            return shapes["max"], "the exported manifest"
    except ManifestError:
        pass
    shapes, _ = profile_shapes(size, num_classes, 16, None, 2048)
    return shapes["max"], f"what `export --size {size[0]} {size[1]}` chooses"


def report(result: dict) -> str:
    env = result["env"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3f}"

    lines = [
        "# GPU check",
        "",
        f"- Device: {env.get('gpu') or env['device']} (compute capability {env.get('compute_capability', '-')}, "
        f"driver {env.get('driver', '-')}, {env.get('memory_gib', '-')} GiB); torch {env['torch']}, CUDA "
        f"{env['cuda']}, cuDNN {env.get('cudnn', '-')}",
        f"- Run: `{result['run']}`; {result['images']} eval images at {result['size'][0]}x{result['size'][1]}",
        "",
        "## Argmax agreement with strict fp32 (the parity gate asks 99.9 % of fp32 engines, 99 % of fp16)",
        "",
        "| student | TF32 % | fp16 % | bf16 % |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["agreement"].items():
        lines.append(f"| {name} | {pct(row['tf32'])} | {pct(row['fp16'])} | {pct(row['bf16'])} |")
    shape = result["profile_max"]
    lines += [
        "",
        f"## Peak memory of one forward pass at the largest profile {shape} ({result['profile_source']})",
        "",
        "| student | fp32 GiB | fp16 GiB |",
        "|---|---:|---:|",
    ]
    for name, row in result["peak_memory"].items():
        lines.append(f"| {name} | {row['fp32'] if row['fp32'] is not None else 'n/a'} | "
                     f"{row['fp16'] if row['fp16'] is not None else 'n/a'} |")  # fmt: skip
    lines.append(f"\n{result['seconds']:.0f} s in all.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=4, help="eval images in the agreement check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False  # the same kernels for every precision mode
    cfg = load_run_config(args.run)
    students = {n: m.to(device).eval() for n, m in load_students(args.run, cfg).items()}
    size = tuple(args.size)
    images = eval_images(args.run, size, args.images).to(device)
    shape, source = largest_profile(args.run, size, cfg.data.num_classes)
    result = {
        "run": str(args.run),
        "size": list(size),
        "images": len(images),
        "env": probe(device),
        "agreement": agreement(students, images, device),
        "profile_max": shape,
        "profile_source": source,
        "peak_memory": peak_memory(students, shape, device),
    }
    result["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
