"""Model cards: README.md in each engine dir and one for the export dir, written from the manifests.
`export` and `export.tensorrt` (which change the engines) rewrite them, so a card always lists the engines
beside it; the bench writes its own report (`<run>/bench/report.md`), which the cards point to."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.manifest import MANIFEST_FILE, Manifest, ManifestError, hex_colour, read_manifest, sizes_text

log = logging.getLogger(__name__)
CARD = "README.md"
IO_TEXT = {"labels": "uint8 RGB image in, class map out", "logits": "normalised NCHW in, logits out"}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _imported(source: dict) -> str:
    if source["format"] == "onnx":
        origin = (
            f"Imported from the onnx graph `{source['path']}` (sha256 `{source['sha256'][:16]}…`, {source['producer']})"
        )
        reference = "the source graph on ONNX Runtime fp32"
    else:
        origin = (
            f"Imported from the {source['format']} checkpoint `{source['path']}` ({source['architecture']}, "
            f"`{source['file']}` sha256 `{source['sha256'][:16]}…`, transformers {source.get('transformers')})"
        )
        reference = "the source model"
    masks = (
        "masks given with its images"
        if source.get("gate_masks") == "given"
        else "the source's own class maps, so an engine's gate mIoU is its class-balanced agreement with the source"
    )
    return f"{origin}; the gate compares every engine with {reference}, and its masks are {masks}."


def engine_card(engine_dir: Path, manifest: Manifest, config: dict | None) -> str:
    m, data = manifest, (config or {}).get("data", {})
    dataset = f"{data.get('root', '?')} ({data.get('format', '?')})"
    source = m.source
    lines = [
        f"# {m.student}: {m.arch} on {m.backbone}",
        "",
        f"A semantic segmentation model for the {m.num_classes} classes of {dataset}, exported by segdeploy "
        f"{m.exporter.get('segdeploy', '?')} from run `{Path(str(source.get('run', '?'))).name}` "
        f"(weights `{source.get('weights')}`, sha256 `{str(source.get('sha256'))[:16]}…`). "
        + (
            _imported(source["imported"])
            if "imported" in source
            else f"Best validation mIoU of the PyTorch student: **{_pct(source.get('val_miou'))} %**."
        ),
        "",
        *_engines(m),
        "",
        "## Classes",
        "",
        "| id | class | colour |",
        "|---:|---|---|",
        *(
            f"| {i} | {c} | `{hex_colour(rgb)}` {tuple(rgb)} |"
            for i, (c, rgb) in enumerate(zip(m.classes, m.palette, strict=True))
        ),
        "",
        *_usage(engine_dir, m),
        "",
        "## Limits",
        "",
        f"- Trained on {dataset} only: scenes and classes unlike those are outside what it learnt.",
        f"- Engines accept batch 1–{m.shapes['max'][0]} and sizes from {m.shapes['min'][1]}×{m.shapes['min'][2]} "
        f"to {m.shapes['max'][1]}×{m.shapes['max'][2]} (larger images are scaled down into the range by `serve`, or "
        f"slid over in windows with `--slide`); {_gated_sizes(m)}.",
        "- Reduced-precision engines are gated on the eval images above; check them on your own data before "
        "relying on them.",
    ]
    return "\n".join(lines) + "\n"


def _gated_sizes(m: Manifest) -> str:
    """Which input sizes the parity gate checked: the serving size, and the profile's sweep where it ran."""
    opt, sizes = m.shapes["opt"], m.exporter.get("parity", {}).get("sizes", [])
    if not sizes:
        return f"the parity gate checked {opt[1]}×{opt[2]} only"
    listed = ", ".join(f"{h}×{w}" for h, w in sizes)
    largest = m.shapes["max"][0]
    return f"the parity gate checked {listed} (the profile's corners and off-grid sizes) at batch 1 and {largest}"


def _engines(m: Manifest) -> list[str]:
    """The engines beside the card, how each was gated, and what was left out."""
    parity, opt = m.exporter.get("parity", {}), m.shapes["opt"]
    lines = [
        "## Engines",
        "",
        "Each was checked against the PyTorch student by the export's parity gate (pixel agreement and mIoU "
        f"difference on {parity.get('images', '?')} eval images at {opt[1]}×{opt[2]}, batch sizes "
        f"{', '.join(map(str, parity.get('batch_sizes', [])))}).",
        "",
        "| file | variant | precision | I/O | runs on | MiB | agreement | ΔmIoU |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for e in m.engines:
        p = e.parity or {}
        gpu = f", TensorRT {(e.tensorrt or {}).get('gpu', '')}" if e.format == "plan" else f", {e.device}"
        agreement = f"{p['agreement']:.4f}" if "agreement" in p else "-"
        delta = f"{p['miou_delta']:.4f}" if "miou_delta" in p else "-"
        cells = [f"`{e.file}`", e.variant, e.precision, IO_TEXT[e.io], e.runtime + gpu, f"{e.size_bytes / 2**20:.1f}"]
        lines.append("| " + " | ".join([*cells, agreement, delta]) + " |")
    for e in (e for e in m.engines if e.profile):
        sizes = sizes_text(e.profile, "×")
        where = f"from {sizes}" if " to " in sizes else f"at {sizes}"
        lines.append(f"\nOnly {where}: `{e.file}` on **{e.runtime} {e.precision}** ({e.profile['reason']}); other "
                     "sizes run on the next engine (fp32)")  # fmt: skip
    for s in m.skipped:
        lines.append(f"\nNot shipped: **{s['runtime']} {s['precision']}** ({s['variant']}), {s['reason']}")
    run = m.source.get("run", "RUN")
    lines += ["", f"Latency and accuracy on a host: `python -m benchmarks.bench --run {run}` (`bench/report.md`)."]
    return lines


def _usage(engine_dir: Path, m: Manifest) -> list[str]:
    return [
        "## How to run it",
        "",
        "```bash",
        f"python -m serve.predict --engines {engine_dir.parent} --model {m.student} --out masks photos/ video.mp4",
        f"python -m serve.predict --engines {engine_dir / 'model.fp32.onnx'} --out masks photos/  # the file alone",
        f"python -m serve --engines {engine_dir.parent}                 # the Gradio demo",
        f"python -m export.triton --run {m.source.get('run', 'RUN')}      # a Triton model repository",
        "```",
        "",
        "```python",
        "from serve.images import read_image",
        "from serve.segmenter import load_segmenter",
        f'segmenter = load_segmenter("{engine_dir.parent}", "{m.student}", "ort.cpu.fp32")',
        'labels = segmenter.predict(read_image("photo.jpg")).labels  # (H, W) uint8 class ids',
        "```",
        "",
        f"Input: RGB, normalised with mean {m.preprocess['mean']} and std {m.preprocess['std']} (the `labels` "
        "engines take uint8 and do it inside).",
    ]


def export_card(root: Path, manifests: dict[str, Manifest], config: dict | None) -> str:
    data = (config or {}).get("data", {})
    lines = [
        f"# Engines of run `{root.parent.name}`",
        "",
        f"Dataset: {data.get('root', '?')} ({data.get('format', '?')}). One engine dir per student; each has "
        "its own card (README.md) and `manifest.json`. The ensemble (mean of both students' softmax) runs "
        "from the two `logits` engines: `python -m serve.predict --engines . --model ensemble ...`.",
        "",
        "| student | model | val mIoU % | engines |",
        "|---|---|---:|---|",
    ]
    for student, m in manifests.items():
        variants = ", ".join(sorted({f"{e.precision} on {e.runtime}" for e in m.engines}))
        model = f"{m.arch} on {m.backbone}"
        lines.append(f"| [{student}]({student}/{CARD}) | {model} | {_pct(m.source.get('val_miou'))} | {variants} |")
    return "\n".join(lines) + "\n"


def write_cards(root: str | Path) -> list[Path]:
    """(Re)write the cards of every engine dir under `root` (a run's export dir)."""
    root = Path(root)
    manifests = {}
    for d in sorted(p.parent for p in root.glob(f"*/{MANIFEST_FILE}")):
        try:
            manifests[d.name] = read_manifest(d)
        except ManifestError as e:
            log.warning("no model card for %s: %s", d, e)
    if not manifests:
        return []
    config = _run_config(Path(str(next(iter(manifests.values())).source.get("run", ""))))
    written = []
    for student, manifest in manifests.items():
        path = root / student / CARD
        path.write_text(engine_card(root / student, manifest, config))
        written.append(path)
    (root / CARD).write_text(export_card(root, manifests, config))
    return [*written, root / CARD]


def _run_config(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None
