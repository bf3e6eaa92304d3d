"""Training speed: images/s of one full training step (both students, forward, loss, backward, two
optimizer steps) for each method preset, and the cost of the collaborative terms.

python -m benchmarks.train_speed [--config configs/synthetic.yaml] [--crop 512 1024] [--batch 8]
    [--device auto] [--amp none|bf16|fp16] [--presets independent full] [--json out.json] [overrides]

The presets are timed in alternating rounds on the same random batch, so drift of the machine
(clock, other load) hits them alike; the overhead is `full step time / independent step time - 1`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.hardware import cpu_model
from train.config import load_config
from train.trainer import Batch, Trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def build(cfg_path: Path, preset: str, overrides: list[str], run_dir: Path) -> Trainer:
    cfg = load_config(cfg_path, [*overrides, f"method.preset={preset}", "data.verify=false"])
    return Trainer(cfg, run_dir / preset)


def time_steps(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.step(Batch(images, labels))
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: build(args.config, p, args.overrides, Path(tmp)) for p in args.presets}
        first = next(iter(trainers.values()))
        device, cfg = first.device, first.cfg
        h, w = args.crop or cfg.data.crop_size
        batch = args.batch or cfg.data.batch_size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, h, w, generator=g).to(device)
        if device.type == "cuda" and cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, cfg.data.num_classes, (batch, h, w), generator=g)
        labels[:, : h // 8] = 255  # some ignore pixels, as in real crops
        labels = labels.to(device)

        times: dict[str, list[float]] = {p: [] for p in trainers}
        peak: dict[str, int | None] = {}
        for trainer in trainers.values():
            trainer.model.train()
            time_steps(trainer, images, labels, args.warmup)
        rounds = max(1, args.rounds)
        for _ in range(rounds):
            for preset, trainer in trainers.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[preset] += time_steps(trainer, images, labels, max(1, args.steps // rounds))
                if device.type == "cuda":
                    peak[preset] = max(peak.get(preset) or 0, torch.cuda.max_memory_allocated(device))

    results: dict = {
        "device": device_name(device),
        "torch": torch.__version__,
        "crop": [h, w],
        "batch": batch,
        "amp": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(first.amp_dtype, "none"),
        "channels_last": bool(cfg.channels_last and device.type == "cuda"),
    }
    for preset, ts in times.items():
        median = statistics.median(ts)
        results[preset] = {
            "images_per_s": batch / median,
            "step_ms": {"median": 1e3 * median, "min": 1e3 * min(ts), "max": 1e3 * max(ts)},
            "steps": len(ts),
            "peak_gpu_mib": peak[preset] / 2**20 if preset in peak else None,
        }
    if "independent" in times and "full" in times:
        results["overhead"] = results["full"]["step_ms"]["median"] / results["independent"]["step_ms"]["median"] - 1
    if args.profile:
        for preset, trainer in trainers.items():
            results[preset]["profile"] = profile_step(trainer, images, labels, args.profile)
    return results


def profile_step(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, rows: int) -> str:
    """The ops of one step that take the most time on the device (self time), as torch.profiler's table."""
    cuda = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        time_steps(trainer, images, labels, 2)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def format_table(results: dict) -> str:
    base = results.get("independent", {}).get("step_ms", {}).get("median")
    lines = [
        f"{results['device']}, torch {results['torch']}, crop {results['crop'][0]}x{results['crop'][1]}, "
        f"batch {results['batch']}, amp {results['amp']}",
        "",
        "| preset | images/s | step ms (median) | min | max | vs independent | peak GPU MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, r in results.items():
        if not isinstance(r, dict) or "images_per_s" not in r:
            continue
        ms = r["step_ms"]
        ratio = f"{ms['median'] / base:.3f}x" if base else "-"
        mem = f"{r['peak_gpu_mib']:.0f}" if r["peak_gpu_mib"] is not None else "-"
        lines.append(
            f"| {preset} | {r['images_per_s']:.1f} | {ms['median']:.1f} | {ms['min']:.1f} | {ms['max']:.1f} "
            f"| {ratio} | {mem} |"
        )
    if "overhead" in results:
        lines += ["", f"HFD+BSD overhead (full / independent step time - 1): {100 * results['overhead']:+.1f}%"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_speed", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/synthetic.yaml"))
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="default: the config's crop")
    parser.add_argument("--batch", type=int, help="default: the config's batch size")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--amp", choices=["none", "bf16", "fp16"], help="default: the config's (on a CPU: bf16 where native)"
    )
    parser.add_argument("--presets", nargs="+", default=["independent", "full"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per preset")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    parser.add_argument("--rounds", type=int, default=4, help="alternations between presets")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print each preset's N costliest ops")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. cnn.output_stride=8")
    args = parser.parse_args(argv)
    args.overrides = [*args.overrides, f"device={args.device}", "iterations=1000000"]
    if args.amp:
        args.overrides.append(f"amp={args.amp}")
    results = measure(args)
    for preset in args.presets if args.profile else []:
        print(f"## {preset}: one step, profiled\n{results[preset]['profile']}")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
