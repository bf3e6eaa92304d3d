"""Which one setting stops bf16 training from diverging on CUDA: the same short run, one change at a time.

python -m benchmarks.bf16_bisect --out DIR [--seeds 0 1] [--iterations 500] [--variants ...] [overrides]

At 256x256 on an H200 the ViT's loss went NaN at the peak of its learning-rate warm-up in every bf16 run, and
in none in fp32 (benchmarks/results/ablation-synthetic-256-h200.md). Each variant below trains
`configs/synthetic-256.yaml` (`independent`) in bf16 with one setting changed, all variants and seeds at once
on the GPU; a run that diverges stops with exit 3 (the trainer's NaN check). Each run's row (diverged or not,
at which iteration, its last val mIoU) is appended to DIR/rows.jsonl as soon as it ends, and DIR/bisect.md
tabulates them at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# variant -> (config overrides, environment): each changes one thing against `bf16`
VARIANTS = {
    "bf16": ([], {}),
    "bf16-no-fused-attention": ([], {"TIMM_FUSED_ATTN": "0"}),  # timm's attention as matmul + softmax
    "bf16-no-channels-last": (["channels_last=false"], {}),
    "bf16-grad-clip": (["vit.optimizer.grad_clip=1.0", "cnn.optimizer.grad_clip=1.0"], {}),
    "bf16-no-compiled-losses": (["compile_losses=false"], {}),
    "bf16-vit-half-lr": (["vit.optimizer.lr=0.002"], {}),  # the peak the warm-up climbs to, halved
    "fp32": (["amp=none"], {}),  # the control: did not diverge
}


def command(variant: str, seed: int, args: argparse.Namespace) -> tuple[list[str], dict]:
    overrides, env = VARIANTS[variant]
    run_dir = args.out / "runs" / f"{variant}-seed{seed}"
    cmd = [sys.executable, "-m", "train", "--config", str(args.config), "--run-dir", str(run_dir), "amp=bf16",
           f"seed={seed}", f"iterations={args.iterations}", f"eval_interval={args.iterations}",
           f"checkpoint_interval={args.iterations}", "data.num_workers=1", *args.overrides, *overrides]  # fmt: skip
    return cmd, {**os.environ, **env}


def row(variant: str, seed: int, code: int, log: str, seconds: float) -> dict:
    diverged = re.search(r"training diverged at iteration (\d+)", log)
    miou = re.findall(r"val mIoU\s+cnn ([\d.]+)\s+vit ([\d.]+)", log)
    return {
        "variant": variant,
        "seed": seed,
        "exit": code,
        "diverged": code == 3,
        "at_iteration": int(diverged.group(1)) if diverged else None,
        "val_miou_cnn_vit": [float(v) for v in miou[-1]] if miou else None,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_bisect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/synthetic-256.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iterations", type=int, default=500, help="past the lr peak (warm-up 250)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_file = args.out / "rows.jsonl"
    running = {}
    for variant in args.variants:
        for seed in args.seeds:
            cmd, env = command(variant, seed, args)
            log = (args.out / f"{variant}-seed{seed}.log").open("w")
            running[(variant, seed)] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log, time.monotonic())
    rows = []
    while running:
        time.sleep(2)
        for key, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            rows.append(row(*key, proc.returncode, Path(log.name).read_text(), time.monotonic() - started))
            with rows_file.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            del running[key]
    lines = ["| variant | seed | diverged | at iteration | val mIoU CNN / ViT |", "|---|---:|---|---:|---|"]
    for r in sorted(rows, key=lambda r: (args.variants.index(r["variant"]), r["seed"])):
        miou = " / ".join(map(str, r["val_miou_cnn_vit"])) if r["val_miou_cnn_vit"] else "-"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['diverged']} | {r['at_iteration'] or '-'} | {miou} |")
    (args.out / "bisect.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
