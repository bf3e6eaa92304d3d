"""The gate a benchmark passes before any method arm runs on it: do the two students know different things?

python -m benchmarks.gate --runs runs/gate/independent/seed0 runs/gate/independent/seed1 ...
    --cnn-classes fine_stripes fine_noise --vit-classes disc triangle [--out gate.md]

It reads `independent` runs (one per tuning seed; checkpoints and numbers from the eval split) and checks,
on every seed:
- each student leads the other by at least LEAD points of mean IoU on its own group of classes;
- an oracle that takes, per pixel, a student that is right beats the better student by at least ORACLE points;
- at most SHARED of the pixels either student gets wrong are wrong for both;
- in the last quarter of training, at least ONE_RIGHT of the labelled pixels of a batch have exactly one
  student right (`train/one_right`, logged by every run).

With `--full-runs` (few labels, many images: `--runs` are then the `supervised` runs at the chosen label
count, `--full-runs` the `independent` runs with every label, one per seed, in the same order) it checks
instead, on every seed, that there is room for unlabelled images to fill and that the students still
know different things:
- each student, trained on the labelled subset only, is at least ROOM points of mIoU below itself
  trained with every label;
- each student still leads the other by at least LEAD points on its own group of classes.
Exit status 0 when every check passes on every seed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from benchmarks.ablation import group_mean, scalars, table
from train.run_dir import CONFIG_FILE, METRICS_FILE

LEAD, ORACLE, SHARED, ONE_RIGHT, ROOM = 4.0, 5.0, 0.40, 0.05, 8.0


def seed_stats(run_dir: Path, cnn_group: list[str], vit_group: list[str]) -> dict[str, float]:
    """The gate's numbers for one `independent` run."""
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    if "oracle" not in metrics:
        raise SystemExit(f"{run_dir / METRICS_FILE}: no oracle record (trained before the gate's statistics)")
    cfg = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    names, iterations = cfg["data"]["class_names"], cfg["iterations"]
    late = [v for step, v in scalars(run_dir).get("train/one_right", []) if step > 0.75 * iterations]
    if not late:
        raise SystemExit(f"{run_dir}: no train/one_right logged in the last quarter of training")
    cnn, vit, oracle = metrics["cnn"], metrics["vit"], metrics["oracle"]
    return {
        "cnn_lead": group_mean(cnn["iou"], names, cnn_group) - group_mean(vit["iou"], names, cnn_group),
        "vit_lead": group_mean(vit["iou"], names, vit_group) - group_mean(cnn["iou"], names, vit_group),
        "oracle_gain": 100 * (oracle["miou"] - max(cnn["miou"], vit["miou"])),
        "shared_errors": oracle["shared_errors"],
        "one_right": statistics.fmean(late),
    }


def room(run_dir: Path, full_dir: Path) -> dict[str, float]:
    """How far each student trained on the labelled subset stays below itself with every label (points)."""
    few, full = (json.loads((d / METRICS_FILE).read_text()) for d in (run_dir, full_dir))
    return {f"{s}_room": 100 * (full[s]["miou"] - few[s]["miou"]) for s in ("cnn", "vit")}


FEW_LABELS = ("cnn_lead", "vit_lead", "cnn_room", "vit_room")  # the checks with --full-runs
CHECKS = {  # statistic -> (passes, the rule as the report states it)
    "cnn_lead": (lambda v: v >= LEAD, f"≥ +{LEAD:g}"),
    "vit_lead": (lambda v: v >= LEAD, f"≥ +{LEAD:g}"),
    "oracle_gain": (lambda v: v >= ORACLE, f"≥ +{ORACLE:g}"),
    "shared_errors": (lambda v: v <= SHARED, f"≤ {SHARED:.0%}"),
    "one_right": (lambda v: v >= ONE_RIGHT, f"≥ {ONE_RIGHT:.0%}"),
    "cnn_room": (lambda v: v >= ROOM, f"≥ +{ROOM:g}"),
    "vit_room": (lambda v: v >= ROOM, f"≥ +{ROOM:g}"),
}


def verdict(stats: dict[str, dict[str, float]]) -> tuple[bool, list[str]]:
    """Whether every check passes on every seed, and the Markdown table that shows it."""
    rows, passed = [], True
    checked = [name for name in CHECKS if all(name in s for s in stats.values())]
    for name, (ok, rule) in ((n, CHECKS[n]) for n in checked):
        values = [s[name] for s in stats.values()]
        fine = all(ok(v) for v in values)
        passed &= fine
        shown = [f"{v:.1%}" if name in ("shared_errors", "one_right") else f"{v:+.2f}" for v in values]
        rows.append([name, rule, *shown, "pass" if fine else "**fail**"])
    return passed, table(["statistic", "rule", *stats, "every seed"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="independent runs, one per tuning seed")
    parser.add_argument("--cnn-classes", nargs="+", required=True, help="the group the CNN is expected to lead")
    parser.add_argument("--vit-classes", nargs="+", required=True, help="the group the ViT is expected to lead")
    parser.add_argument(
        "--full-runs", nargs="+", type=Path, help="few labels: independent runs with every label, one per --runs"
    )
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.full_runs and len(args.full_runs) != len(args.runs):
        parser.error(f"--full-runs: {len(args.full_runs)} runs for {len(args.runs)} --runs (one per seed)")
    stats = {run.name: seed_stats(run, args.cnn_classes, args.vit_classes) for run in args.runs}
    if args.full_runs:
        stats = {
            name: {k: v for k, v in (s | room(run, full)).items() if k in FEW_LABELS}
            for (name, s), run, full in zip(stats.items(), args.runs, args.full_runs, strict=True)
        }
    passed, lines = verdict(stats)
    text = "\n".join(
        [
            f"CNN's group: {', '.join(args.cnn_classes)}; ViT's group: {', '.join(args.vit_classes)}",
            "",
            *lines,
            "",
            f"Gate: **{'passed' if passed else 'failed'}**",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
