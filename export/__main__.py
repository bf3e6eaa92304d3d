"""Export the students of a run dir to ONNX engines, each through the parity gate.

python -m export --run runs/<name> [--students cnn vit] [--variants fp32 fp16 int8.qdq int8.cpu]
    [--size H W] [--max-batch 16] [--max-size H W] [--profile-budget-mib 2048]
    [--parity-images 50] [--batch-sizes 1 4 16] [--calib-images 64] [--out DIR]
python -m export --from-transformers DIR [--run runs/<name>] [--images DIR] [...]   (docs/import.md)
python -m export --from-onnx model.onnx --classes FILE [--run runs/<name>] [--images DIR] [...]

Writes runs/<name>/export/<student>/ with model.<variant>.onnx (labels: uint8 image in, class map
out), model.<variant>.logits.onnx, manifest.json, parity.json and README.md (the model card). The
engines' shape range (TensorRT's profile) is sized so that the logits at its max stay within
--profile-budget-mib. The gate also runs every engine at the profile's corners (smallest, largest, both
extreme aspect ratios) and at sizes off the 32-pixel grid, at batch 1 and the largest batch
(--no-size-sweep: at the serving size only). The traced graph is kept for the next export of the same
weights in ~/.cache/segdeploy/traces ($SEGDEPLOY_CACHE: another dir, or off). Exit 1 when a gate fails,
2 on bad input.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shutil
import sys
from pathlib import Path

from serve.manifest import VARIANTS
from train.run_dir import STUDENTS, weights_file

# Gate settings that differ between a run trained here and an import (--from-*), whose user expects engines in about
# a minute: fewer images, batches up to 4 (every size of the sweep still checked, at batch 1 and the largest).
GATE_DEFAULTS = {
    "trained": {"max_batch": 16, "parity_images": 50, "batch_sizes": [1, 4, 16], "calib_images": 64},
    "imported": {"max_batch": 4, "parity_images": 16, "batch_sizes": [1, 4], "calib_images": 16},
}


def parser() -> argparse.ArgumentParser:
    defaults = {"agreement": (0.999, 0.99), "miou": (0.001, 0.01)}
    p = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, help="run dir written by `python -m train` (or to write, with --from-*)")
    p.add_argument(
        "--from-transformers",
        type=Path,
        metavar="DIR",
        help="a transformers SegFormer checkpoint (save_pretrained's folder): written as the vit student of --run "
        "(default runs/<DIR's name>), then exported",
    )
    p.add_argument(
        "--from-onnx",
        type=Path,
        metavar="FILE",
        help="an ONNX segmentation graph (float image in, N x C x h x w logits out; torchvision, "
        "segmentation_models_pytorch, mmsegmentation): written as --student of --run, then exported",
    )
    p.add_argument(
        "--classes",
        type=Path,
        metavar="FILE",
        help="with --from-onnx: class names (and palette), YAML or JSON: a list, {names, palette} or {id: name}",
    )
    p.add_argument("--student", choices=STUDENTS, default="cnn", help="with --from-onnx: the slot it serves as")
    p.add_argument("--output", metavar="NAME", help="with --from-onnx: the logits output (default: the first 4-D)")
    p.add_argument("--mean", type=float, nargs=3, help="with --from-onnx: its input's mean, 0-1 scale (ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="with --from-onnx: its input's std, 0-1 scale (ImageNet's)")
    p.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="with --from-*: the images the gate runs on (default: synthetic); DIR/images + DIR/masks: with masks",
    )
    p.add_argument("--students", nargs="+", metavar="STUDENT", help="default: every student the run has weights for")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--out", type=Path, help="engine dirs go to OUT/<student> (default: RUN/export)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="serving size (default: eval images')")
    p.add_argument("--max-batch", type=int, help="default 16; 4 with --from-*")
    p.add_argument(
        "--max-size", type=int, nargs=2, metavar=("H", "W"), help="largest input (default: 2x serving size if it fits)"
    )
    p.add_argument(
        "--profile-budget-mib", type=float, default=2048, help="cap on the logits at the profile's max (batch x size)"
    )
    p.add_argument("--parity-images", type=int, help="default 50; 16 with --from-*")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 4 16; 1 4 with --from-*")
    p.add_argument("--calib-images", type=int, help="default 64; 16 with --from-*")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument(
        "--fp16-keep-fp32",
        nargs="+",
        default=[],
        metavar="OP",
        help="op types the fp16 graph also keeps in fp32 (e.g. LayerNormalization Softmax, where fp16 overflows)",
    )
    p.add_argument("--no-openvino", action="store_true", help="no OpenVINO engines (default: where installed)")
    p.add_argument(
        "--no-size-sweep",
        action="store_true",
        help="gate at the serving size only, not also at the profile's other sizes (faster, most of all with "
        "OpenVINO, which compiles every shape; an engine wrong at another size can ship)",
    )
    p.add_argument("--int8-min-speedup", type=float, default=1.5, help="CPU int8 vs the fastest float engine")
    p.add_argument("--int8-max-miou-delta", type=float, default=0.005, help="CPU int8's |ΔmIoU| at the gate")
    p.add_argument("--fp32-agreement", type=float, default=defaults["agreement"][0])
    p.add_argument("--fp32-miou-delta", type=float, default=defaults["miou"][0])
    p.add_argument("--reduced-agreement", type=float, default=defaults["agreement"][1], help="fp16 and int8")
    p.add_argument("--reduced-miou-delta", type=float, default=defaults["miou"][1], help="fp16 and int8")
    return p


def options(args: argparse.Namespace):
    from export.parity import Threshold  # imports torch: keep --help fast
    from export.pipeline import ExportOptions

    present = [s for s in STUDENTS if weights_file(args.run, s).is_file() or (args.run / f"{s}.onnx").is_file()]
    return ExportOptions(
        students=args.students or present or list(STUDENTS),
        variants=args.variants,
        out=args.out,
        size=tuple(args.size) if args.size else None,
        max_batch=args.max_batch,
        max_size=tuple(args.max_size) if args.max_size else None,
        profile_budget_mib=args.profile_budget_mib,
        parity_images=args.parity_images,
        batch_sizes=args.batch_sizes,
        calib_images=args.calib_images,
        simplify=not args.no_simplify,
        fp16_keep_fp32=args.fp16_keep_fp32,
        openvino=not args.no_openvino,
        size_sweep=not args.no_size_sweep,
        int8_min_speedup=args.int8_min_speedup,
        int8_max_miou_delta=args.int8_max_miou_delta,
        thresholds={
            "fp32": Threshold(args.fp32_agreement, args.fp32_miou_delta),
            "reduced": Threshold(args.reduced_agreement, args.reduced_miou_delta),
        },
    )


def summary(manifests: dict) -> None:
    """Each student's engines with their gate numbers, and what was not shipped and why."""
    for name, m in manifests.items():
        print(f"\n{name} ({m.arch}, {m.backbone}): {len(m.engines)} engines")
        print("| file | runtime | precision | io | MiB | agreement | mIoU engine / reference |")
        print("|---|---|---|---|---:|---:|---:|")
        for e in m.engines:
            p = e.parity
            worst = min(p["batch_sizes"].values(), key=lambda r: r["agreement"])
            print(
                f"| {e.file} | {e.runtime} | {e.precision} | {e.io} | {e.size_bytes / 2**20:.1f} | "
                f"{100 * p['agreement']:.3f}% | {100 * worst['miou']:.2f} / {100 * worst['miou_torch']:.2f} |"
            )
        for s in m.skipped:
            print(f"not shipped: {s['runtime']} {s['precision']} ({s['variant']}): {s['reason']}")


def disk_full(args: argparse.Namespace, out: Path) -> str:
    """What a full disk stopped: where, what the export needs (each student's graphs in both I/O modes, from the
    size of its weights and each variant's bytes per weight) and what is free; the engines already there are
    untouched (nothing of this export went live)."""
    share = {"fp32": 1.0, "fp16": 0.5, "int8.qdq": 0.25, "int8.cpu": 0.25}
    weights = sum(
        (args.run / f"{s}.safetensors").stat().st_size
        for s in args.students
        if (args.run / f"{s}.safetensors").is_file()
    )
    need = 2 * weights * sum(share.get(v, 1.0) for v in args.variants)
    free = shutil.disk_usage(out if out.exists() else out.parent).free
    return (
        f"no space left on the disk of {out}: this export needs about {need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB "
        "are free; the engines already there are untouched (nothing of this export went live)"
    )


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    import onnx.defs

    if unknown := [op for op in args.fp16_keep_fp32 if not onnx.defs.has(op)]:  # a typo would keep nothing
        cli.error(f"--fp16-keep-fp32: {unknown[0]!r} is not an ONNX op type (e.g. LayerNormalization, Softmax)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):  # graph-rewrite logs, one line per pass
        logging.getLogger(chatty).setLevel(logging.WARNING)

    from export.parity import ParityError
    from export.pipeline import export_run
    from train.config import ConfigError
    from train.data import DatasetError
    from train.run_dir import RunBusy, held

    source = args.from_transformers or args.from_onnx
    if (args.from_transformers and args.from_onnx) or not (args.run or source):
        cli.error("give --run RUN (a run dir), or one of --from-transformers DIR, --from-onnx FILE")
    if args.from_onnx and not args.classes:
        cli.error("--from-onnx needs --classes FILE (the names of its output's channels)")
    for key, value in GATE_DEFAULTS["imported" if source else "trained"].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.run = args.run or Path("runs") / source.stem
    out = args.out or args.run / "export"
    try:
        count = max(args.parity_images, args.calib_images)
        if args.from_transformers:
            from export.imported import from_transformers

            from_transformers(args.from_transformers, args.run, args.images, count)
        elif args.from_onnx:
            from export.imported import from_onnx
            from train.data.transforms import IMAGENET_MEAN, IMAGENET_STD

            size = tuple(args.size) if args.size else None
            from_onnx(args.from_onnx, args.classes, args.run, args.images, count, args.student, size, args.output,
                      args.mean or IMAGENET_MEAN, args.std or IMAGENET_STD)  # fmt: skip
        with held(out.parent / f"{out.name}.lock", "an export"):  # one export at a time into an engine dir
            manifests = export_run(args.run, options(args))
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {disk_full(args, out) if e.errno == errno.ENOSPC else e}", file=sys.stderr)
        return 2
    except (ConfigError, DatasetError, ValueError, RunBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary(manifests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
