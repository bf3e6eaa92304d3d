"""The comparison run: every method preset trained on the same data, seed and budget.

python -m benchmarks.ablation [--config configs/synthetic.yaml] [--out runs/ablation]
    [--presets independent dml hfd bsd full] [overrides]

Each preset trains in its own run dir `<out>/<preset>` (a killed ablation resumes where it stopped;
finished presets are not trained again), then `<out>/table.md` gets one row per preset with the
val mIoU of the CNN, the ViT and their ensemble.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.train_speed import cpu_model
from train.config import load_config
from train.losses import PRESETS
from train.run_dir import CHECKPOINT_FILE, METRICS_FILE

MODELS = ("cnn", "vit", "ensemble")


def train(preset: str, config: Path, run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / METRICS_FILE).is_file():
        print(f"[{preset}] done before: {run_dir / METRICS_FILE}", flush=True)
        return
    if (run_dir / CHECKPOINT_FILE).is_file():
        cmd = ["--resume", str(run_dir)]
    else:
        cmd = ["--config", str(config), "--run-dir", str(run_dir), f"name={run_dir.name}", *overrides]
    print(f"[{preset}] training in {run_dir}", flush=True)
    subprocess.run([sys.executable, "-m", "train", *cmd, f"method.preset={preset}"], check=True)


def table(out: Path, presets: list[str], config: Path, overrides: list[str]) -> str:
    cfg = load_config(config, overrides)
    d = cfg.data
    init = "ImageNet/local encoder weights" if any(s.pretrained or s.weights for s in (cfg.cnn, cfg.vit)) else "random"
    rows = []
    for preset in presets:
        metrics = json.loads((out / preset / METRICS_FILE).read_text())
        rows.append(f"| {preset} | " + " | ".join(f"{100 * metrics[m]['miou']:.2f}" for m in MODELS) + " |")
    command = " ".join(["python -m benchmarks.ablation", "--config", str(config), *overrides])
    return "\n".join(
        [
            f"# Ablation on {d.root} ({d.eval_split} split), val mIoU in %",
            "",
            f"- Command: `{command}`",
            f"- Budget per preset: {cfg.iterations} iterations, batch {d.batch_size}, crop "
            f"{d.crop_size[0]}x{d.crop_size[1]}, seed {cfg.seed}, encoders from {init} initialisation",
            f"- Machine: {cpu_model()}; device `{cfg.device}`; {datetime.date.today()}",
            "- Best weights of each student over the run (evaluated every "
            f"{cfg.eval_interval} iterations); ensemble = mean of the two best students' softmax",
            "",
            "| preset | CNN | ViT | ensemble |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/synthetic.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every preset")
    args = parser.parse_args(argv)
    for preset in args.presets:
        try:
            train(preset, args.config, args.out / preset, args.overrides)
        except subprocess.CalledProcessError as e:
            print(f"[{preset}] training failed (exit {e.returncode})", file=sys.stderr)
            return e.returncode
    text = table(args.out, args.presets, args.config, args.overrides)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
