"""Where reduced precision changes what a student answers: every engine an export of the run gates, at each input
size of the gate's sweep, against the PyTorch student.

python -m benchmarks.precision --run runs/<name> [--students cnn vit] [--variants fp32 int8.cpu ...]
    [--images 16] [--layers 8] [--no-openvino] [--out FILE.md]

The engines are built as `python -m export` builds them (the same graphs, calibration and runtimes; shipped or
refused alike) in a scratch dir. Each engine runs the first `--images` eval images resized to every size of the
gate's sweep (labels by nearest neighbour), in batches of 1 and of the profile's largest batch. Per engine, size
and batch:
- agreement: the share of pixels whose class is the student's;
- confident agreement: the same on the pixels whose student margin (top-1 minus top-2 logit) is above the fp32
  engine's largest logit error there (pixels no engine as exact as the fp32 one could flip), and their share;
- the median student margin where the engine disagrees (near ties, or changed answers);
- the largest and the mean absolute logit error;
- mIoU against the labels of the student and of the engine;
and, as a scale for all of these, the student's agreement with itself when each pixel of the image is off by
one grey level (an imperceptible change). With `--layers N`, for each int8 graph: the N quantized tensors with
the worst quantization error (ONNX Runtime's qdq_loss_debug: the signal-to-quantization-noise ratio of each
tensor's own Q/DQ pair) on the images at the graph's worst size, and the agreement there with fp32 islands: each
quantized op type kept fp32 in turn, then the ops that read the worst 1, 2, 4 ... N tensors. Prints a Markdown
report; `--out` also writes it, and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image

from export import parity, precision
from export.pipeline import ExportOptions, calibration_batches, engine_file, prepare, runner, student_job, write_engines
from serve.host import cpu_model
from serve.manifest import VARIANTS, EngineEntry
from train.config import ConfigError
from train.data import DatasetError
from train.metrics import ConfusionMatrix
from train.run_dir import STUDENTS

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """The images at one size and batch size, and what the student makes of them."""

    size: tuple[int, int]
    batch: int
    inputs: list[np.ndarray]  # normalised NCHW batches
    labels: np.ndarray  # N x H x W
    logits: np.ndarray  # the student's, N x C x H x W
    self_agreement: float  # the student's agreement with itself on the images off by one grey level

    @property
    def key(self) -> str:
        return f"{self.size[0]}x{self.size[1]}@{self.batch}"

    def run(self, engine: parity.Runner) -> np.ndarray:
        return np.concatenate([engine(x) for x in self.inputs])


def samples(reference: parity.Runner, dataset, images: int, sizes, batch_sizes) -> list[Sample]:
    pool = [dataset.read(i) for i in range(min(images, len(dataset)))]
    rng, out = np.random.default_rng(0), []
    for h, w in sizes:
        pixels = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im, _ in pool])
        labels = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for _, m in pool])
        x = parity.normalise(pixels)
        shifted = parity.normalise(np.clip(pixels + rng.integers(-1, 2, pixels.shape), 0, 255).astype(np.uint8))
        for b in batch_sizes:
            inputs = [x[i : i + b] for i in range(0, len(x), b)]
            logits = np.concatenate([reference(i) for i in inputs])
            noisy = np.concatenate([reference(shifted[i : i + b]).argmax(1) for i in range(0, len(x), b)])
            out.append(Sample((h, w), b, inputs, labels, logits, float((noisy == logits.argmax(1)).mean())))
    return out


def miou(classes: np.ndarray, labels: np.ndarray, k: int) -> float:
    matrix = ConfusionMatrix(k)
    matrix.update(torch.from_numpy(classes.astype(np.int64)), torch.from_numpy(labels.astype(np.int64)))
    return matrix.compute()["miou"]


def compare(sample: Sample, logits: np.ndarray, tolerance: float, k: int) -> dict[str, float | None]:
    """One engine's logits at one sample against the student's; `tolerance`: the fp32 engine's largest error."""
    top = np.partition(sample.logits, -2, axis=1)
    margin = top[:, -1] - top[:, -2]
    student, engine = sample.logits.argmax(1), logits.argmax(1)
    same, confident = student == engine, margin > tolerance
    error = np.abs(logits - sample.logits)
    return {
        "agreement": float(same.mean()),
        "confident_agreement": float(same[confident].mean()) if confident.any() else None,
        "confident_share": float(confident.mean()),
        "disagreeing_margin": float(np.median(margin[~same])) if not same.all() else None,
        "max_abs_logit_error": float(error.max()),
        "mean_abs_logit_error": float(error.mean()),
        "miou_student": miou(student, sample.labels, k),
        "miou_engine": miou(engine, sample.labels, k),
    }


def label(entry: EngineEntry) -> str:
    return f"{entry.runtime} {entry.precision} ({entry.variant})"


def sweep(entries: list[EngineEntry], folder: Path, sample_list: list[Sample], k: int) -> dict[str, dict[str, dict]]:
    """{engine: {"HxW@b": compare(...)}} for every logits engine; the fp32 ONNX Runtime engine sets the tolerance."""
    engines = {label(e): runner(e, folder, gate=True) for e in entries if e.io == "logits"}
    fp32 = next(name for name in engines if name.startswith("onnxruntime fp32"))
    rows: dict[str, dict[str, dict]] = {name: {} for name in engines}
    for s in sample_list:
        outputs = {name: s.run(run) for name, run in engines.items()}
        tolerance = float(np.abs(outputs[fp32] - s.logits).max())
        for name, logits in outputs.items():
            rows[name][s.key] = compare(s, logits, tolerance, k) | {"tolerance": tolerance}
    return rows


def islands(job, entries: list[EngineEntry], folder: Path, variant: str, sample: Sample, count: int) -> dict:
    """The int8 `variant`'s worst tensors at `sample`, and each of its engines' agreement there with fp32 islands
    (the graph quantized again, as the export does): each op type kept fp32 in turn, then the ops that read the
    worst 1, 2, 4 ... `count` tensors."""
    fp32 = folder / engine_file("fp32", "logits")
    x = np.concatenate(sample.inputs)[:4]  # every intermediate tensor is held, twice: a few images
    worst = precision.worst_tensors(folder / engine_file(variant, "logits"), fp32, x, count)
    graph = onnx.load(str(fp32))
    trials = {f"{op} kept fp32": [n.name for n in graph.graph.node if n.op_type == op] for op in precision.INT8_OPS}
    trials = {name: nodes for name, nodes in trials.items() if nodes}
    for n in sorted({min(2**i, len(worst)) for i in range(count.bit_length())} - {0}):
        trials[f"worst {n} kept fp32"] = [node for row in worst[:n] for node in row["read_by"]]
    calibration = calibration_batches(job.train_set, job.opts.calib_images, job.cfg.seed)
    engines = [e for e in entries if e.variant == variant and e.io == "logits"]
    agreement: dict[str, dict[str, float]] = {}
    for i, (trial, nodes) in enumerate(trials.items()):
        file = f"model.{variant}.trial{i}.logits.onnx"
        onnx.save(precision.to_int8(graph, calibration, variant, keep_fp32=nodes), str(folder / file))
        agreement[trial] = {}
        for e in engines:
            logits = sample.run(runner(replace(e, file=file), folder, gate=True))
            agreement[trial][label(e)] = float((logits.argmax(1) == sample.logits.argmax(1)).mean())
    return {"size": sample.key, "worst_tensors": worst, "agreement_with_fp32_islands": agreement}


def analyse(run_dir: Path, name: str, opts: ExportOptions, images: int, layers: int, folder: Path) -> dict:
    """Every engine of one student at every size of the gate's sweep (and, with `layers`, its int8 islands)."""
    run = prepare(run_dir, opts)
    job, manifest = student_job(run, name, folder)
    entries = write_engines(job, manifest)
    shapes, k = manifest.shapes, len(manifest.classes)
    sample_list = samples(job.student.reference, run.eval_set, images, parity.gate_sizes(shapes),
                          list(dict.fromkeys([1, shapes["max"][0]])))  # fmt: skip
    rows = sweep(entries, folder, sample_list, k)
    report = {"student": name, "arch": f"{manifest.arch} on {manifest.backbone}", "shapes": shapes, "images": images,
              "self_agreement": {s.key: s.self_agreement for s in sample_list},
              "engines": rows, "thresholds": {e: vars(parity.threshold_for(e.split()[1])) for e in rows}}  # fmt: skip
    if layers:
        by_key = {s.key: s for s in sample_list}
        report["islands"] = {}
        for variant in [v for v in opts.variants if v.startswith("int8")]:
            names = [label(e) for e in entries if e.variant == variant and e.io == "logits"]
            worst = min(((n, key) for n in names for key in rows[n]), key=lambda t: rows[t[0]][t[1]]["agreement"])
            report["islands"][variant] = islands(job, entries, folder, variant, by_key[worst[1]], layers)
    return report


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown(report: dict) -> list[str]:
    """One student's tables: each engine at its worst size, then agreement / confident agreement at every size."""
    rows, lines = report["engines"], []
    keys = list(next(iter(rows.values())))
    lines += [f"## {report['student']} ({report['arch']}): {report['images']} eval images per size, profile "
              f"{report['shapes']['min']} - {report['shapes']['max']}", "",
              "| engine | worst agreement | the student with itself there, ±1 grey level | worst confident agreement "
              "(share confident) | median margin where it disagrees | max logit error | ΔmIoU vs labels, worst | gate "
              "(agreement, min) |", "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, points in rows.items():
        worst = min(keys, key=lambda k: points[k]["agreement"])
        conf = min(keys, key=lambda k: points[k]["confident_agreement"] or 1.0)
        delta = max(keys, key=lambda k: abs(points[k]["miou_engine"] - points[k]["miou_student"]))
        d = points[delta]["miou_engine"] - points[delta]["miou_student"]
        need = report["thresholds"][name]["agreement"]
        margin = points[worst]["disagreeing_margin"]
        lines.append(
            f"| {name} | {pct(points[worst]['agreement'])} at {worst} | {pct(report['self_agreement'][worst])} | "
            f"{pct(points[conf]['confident_agreement'])} "
            f"({pct(points[conf]['confident_share'])}) at {conf} | {'-' if margin is None else f'{margin:.3f}'} | "
            f"{max(p['max_abs_logit_error'] for p in points.values()):.3g} | {100 * d:+.2f} at {delta} | "
            f"{'passes' if points[worst]['agreement'] >= need else 'refuses'} ({100 * need:g} %) |"
        )
    lines += ["", "Agreement / confident agreement (%) at each size@batch:", "",
              "| engine | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]  # fmt: skip
    lines.append("| the student, ±1 grey level | " + " | ".join(pct(report["self_agreement"][k]) for k in keys) + " |")
    for name, points in rows.items():
        cells = [f"{pct(p['agreement'])} / {pct(p['confident_agreement'])}" for p in points.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for variant, found in report.get("islands", {}).items():
        lines += ["", f"{variant} at {found['size']}, its worst size: the quantized tensors with the most error "
                  "(SQNR of their own Q/DQ pair; against fp32, accumulated up to them):", "",
                  "| n | tensor | read by | SQNR own (dB) | SQNR vs fp32 (dB) |",
                  "|---:|---|---|---:|---:|"]  # fmt: skip
        for n, row in enumerate(found["worst_tensors"], 1):
            lines.append(f"| {n} | {row['tensor']} | {', '.join(row['read_by'])} | {row['qdq_sqnr_db']:.1f} | "
                         f"{row.get('sqnr_vs_fp32_db', float('nan')):.1f} |")  # fmt: skip
        trials = found["agreement_with_fp32_islands"]
        names = list(next(iter(trials.values())))
        lines += ["", f"Agreement (%) at {found['size']} with fp32 islands:", "",
                  "| fp32 islands | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]  # fmt: skip
        lines += [f"| {trial} | " + " | ".join(pct(v) for v in row.values()) + " |" for trial, row in trials.items()]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="a training run (or an imported one)")
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--images", type=int, default=16, help="eval images at each size")
    parser.add_argument("--layers", type=int, default=0, help="int8: the worst N quantized tensors, kept fp32")
    parser.add_argument("--no-openvino", action="store_true", help="ONNX Runtime's engines only")
    parser.add_argument("--out", type=Path, help="also write the report here (and its numbers, .json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    variants = list(dict.fromkeys(["fp32", *args.variants]))
    reports, lines = [], [f"CPU: {cpu_model()}; `python -m benchmarks.precision {' '.join(argv or sys.argv[1:])}`", ""]
    with tempfile.TemporaryDirectory(prefix="segdeploy-precision-") as tmp:
        opts = ExportOptions(students=args.students, variants=variants, out=Path(tmp), openvino=not args.no_openvino)
        for name in args.students:
            folder = Path(tmp) / name
            folder.mkdir()
            try:
                reports.append(analyse(args.run, name, opts, args.images, args.layers, folder))
            except (ConfigError, DatasetError, FileNotFoundError) as e:  # the run, its config or its data
                print(f"error: {e}", file=sys.stderr)
                return 2
            lines += markdown(reports[-1])
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
