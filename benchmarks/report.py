"""The bench's report: a Markdown table whose numbers are the JSON's, and two plots (PNG)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [  # header, key, format
    ("model", "model", "{}"),
    ("backend", "backend", "{}"),
    ("precision", "precision", "{}"),
    ("mode", "mode", "{}"),
    ("batch", "batch", "{}"),
    ("size", None, None),
    ("mean ms", "mean_ms", "{:.2f}"),
    ("p50", "p50_ms", "{:.2f}"),
    ("p90", "p90_ms", "{:.2f}"),
    ("p99", "p99_ms", "{:.2f}"),
    ("min", "min_ms", "{:.2f}"),
    ("CV", "cv", "{:.3f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("GFLOP/img", "gflop", "{:.2f}"),
    ("GFLOP/s", "gflops_per_s", "{:.0f}"),
    ("peak GFLOP/s", "peak_gflops", "{:.0f}"),
    ("of peak", "of_peak", "{:.0%}"),
    ("GPU compute ms", "compute_mean_ms", "{:.2f}"),
    ("mIoU", "miou", "{:.4f}"),
    ("torch mIoU", "miou_torch", "{:.4f}"),
    ("ΔmIoU", "delta_miou", "{:+.4f}"),
    ("agreement", "agreement", "{:.4f}"),
    ("file MiB", "file_mib", "{:.1f}"),
    ("build s", "build_s", "{:.1f}"),
    ("RSS MiB", "rss_mib", "{:.0f}"),
    ("status", "status", "{}"),
]
TEXT_KEYS = (None, "model", "backend", "precision", "mode", "status")


def cell(row: dict, key: str | None, fmt: str | None) -> str:
    if key is None:
        return f"{row['height']}x{row['width']}"
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def write_report(result: dict, path: Path) -> None:
    m, v = result["machine"], result["versions"]
    lines = [
        f"# Benchmark of `{result['run']}`",
        "",
        f"- Device: **{m['device']}** (CPU: {m['cpu']}, {m['cpu_count']} logical cores; GPU: {m['gpu'] or 'none'})",
        "- Versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()),
        f"- Threads: torch {result['threads']['torch']}, ONNX Runtime {result['threads']['onnxruntime']}",
        "- GFLOP/s: the model's FLOPs at that size (convolutions and matrix products; slide rows: at every "
        "window) x batch / mean latency; "
        + (
            "peak: this CPU's best matrix product or 1x1 convolution in the row's precision, measured in this run ("
            + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
            + ")"
            if (peaks := result.get("gemm_peak_gflops"))
            else "peak: measured for CPU rows only (none here)"
        )
        + "; ΔmIoU and agreement on the eval images resized to the row's size",
        f"- Command: `{result['command']}`",
        "- Latency: end to end, uint8 images in, class maps out, on the host; speed-up: PyTorch eager fp32 of the "
        "same model, batch and size, in this run.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if k in TEXT_KEYS else "---:" for _, k, _ in COLUMNS) + "|",
    ]
    for row in result["results"]:
        lines.append("| " + " | ".join(cell(row, k, f) for _, k, f in COLUMNS) + " |")
    lines += fastest_engines(result["results"])
    for status, title in (("not shipped", "Not shipped by the export"), ("failed", "Failed")):
        rows = [r for r in result["results"] if r["status"] == status]
        lines += ["", f"## {title}", ""] if rows else []
        for key in dict.fromkeys((r["model"], r["backend"], r.get("error")) for r in rows):
            lines.append(f"- {key[0]} / {key[1]}: {key[2]}")
    path.write_text("\n".join(lines) + "\n")


def fastest_engines(rows: list[dict]) -> list[str]:
    """A table of the fastest engine (not a PyTorch row) of each model at each point of the bench."""
    fastest: dict[tuple, dict] = {}
    for r in (r for r in rows if r["status"] == "ok" and not r["backend"].startswith("torch")):
        key = (r["model"], r["mode"], r["batch"], cell(r, None, None))
        if key not in fastest or r["mean_ms"] < fastest[key]["mean_ms"]:
            fastest[key] = r
    if not fastest:
        return []
    lines = ["", "## Fastest engine", "", "| model | mode | batch | size | backend | mean ms | speed-up | ΔmIoU |"]
    lines.append("|---|---|---:|---|---|---:|---:|---:|")
    for (model, mode, batch, size), r in fastest.items():
        numbers = (cell(r, k, f) for k, f in (("mean_ms", "{:.2f}"), ("speedup", "{:.2f}x"), ("delta_miou", "{:+.4f}")))
        lines.append(f"| {model} | {mode} | {batch} | {size} | {r['backend']} | " + " | ".join(numbers) + " |")
    return lines


def write_plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["results"] if r["status"] == "ok"]
    sizes = list(dict.fromkeys((r["height"], r["width"]) for r in ok))
    paths = [out / "pareto.png", out / "latency_vs_batch.png"]

    fig, ax = plt.subplots(figsize=(7, 5))
    if ok:
        first = min(r["batch"] for r in ok)
        points = [r for r in ok if r["batch"] == first and (r["height"], r["width"]) == sizes[0]]
        for r in points:
            ax.scatter(r["mean_ms"], r["miou"], s=30)
            ax.annotate(f"{r['model']} {r['backend']}", (r["mean_ms"], r["miou"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        front, best = [], -1.0
        for r in sorted(points, key=lambda r: r["mean_ms"]):
            if r["miou"] > best:
                front.append(r)
                best = r["miou"]
        ax.plot([r["mean_ms"] for r in front], [r["miou"] for r in front], "k--", lw=0.8, label="Pareto front")
        ax.set_title(f"mIoU vs latency, batch {first}, {sizes[0][0]}x{sizes[0][1]} ({result['machine']['device']})")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("latency per batch (ms, log)")
    ax.set_ylabel("mIoU on the eval images")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes or [None], strict=False):
        for key in dict.fromkeys((r["model"], r["backend"]) for r in ok):
            series = sorted((r["batch"], r["mean_ms"]) for r in ok if (r["model"], r["backend"]) == key
                            and (r["height"], r["width"]) == size)  # fmt: skip
            if series:
                ax.plot(*zip(*series, strict=True), marker="o", label=" ".join(key))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency per batch (ms)")
        if size:
            ax.set_title(f"{size[0]}x{size[1]}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
