"""The method's comparison protocol: arms x paired seeds, checkpoints picked on val, numbers from test.

python -m benchmarks.ablation [--config configs/synthetic.yaml] [--out runs/ablation]
    [--arms independent dml full] [--arm NAME "key=value ..."] [--seeds 0 1 2] [--jobs 2]
    [--baselines independent dml] [--group NAME CLASS ...] [--report-only] [overrides]

An arm is a method preset (`independent dml hfd bsd full ...`), one term alone (`region_bsd pixel_bsd`),
or a named set of overrides (`--arm gentle "method.preset=full method.pixel_weight=0.3"`), in which `{seed}`
and `{out}` stand for the run's seed and the ablation's folder: `--arm offline "method.preset=offline
method.offline_run={out}/supervised/seed{seed}"` distils from the `supervised` arm's run of the same seed,
and waits for it to finish. Every arm
trains once per seed in `<out>/<arm>/seed<k>`; within a seed every arm starts from the same student
initialisation and sees the same batches in the same order (both follow the seed alone). A killed
ablation resumes where it stopped; finished runs are not trained again. `--report-only` tabulates the
runs that have finished (trained elsewhere, or still training) and trains nothing.

`--jobs N` trains N runs at once with cores/N threads each: the small steps of the synthetic set use
cores poorly, so on 2 cores two 1-thread runs finish 1.4x as many runs per hour as one 2-thread run.

The report (`<out>/table.md`, `results.json`, `curves.png`): held-out test mIoU of the best weights
(picked on the eval split) and of the last weights, mean +- SD over seeds; the paired difference of
each arm to each baseline per seed, with its mean, SD, 95 % interval and worst seed; the per-class IoU
difference to the first baseline and, per `--group` of classes, its mean IoU and paired difference; the
val learning curves; and per distillation term its value, the ratio of its gradient norm to CE's at the student
tensor it acts on, and the direction shares, averaged over the second half of training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.hardware import cpu_model
from serve.decide import ci95
from train.config import Config, ConfigError, DataConfig, config_to_dict, load_config, slot_config
from train.data import LAYOUTS
from train.data.synthetic import STAMP
from train.losses import PRESETS, TERMS, Geometry, method_terms
from train.run_dir import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE

MODELS = ("cnn", "vit", "ensemble")
DEFAULT_ARMS = ["independent", "dml", "full"]
REQUEST_FILE = "request.json"  # what a run was trained for: its resolved config and its data's stamp
# Fields that do not change what a run trains: its name, what the trainer fills in from the data, and the
# ViT's output stride (pvt_v2's is fixed at 32: the ViT reads none).
_UNKEYED = {"name", "data.num_classes", "data.class_names", "data.palette", "vit.output_stride"}
OVERRIDES_HINT = " (config overrides go before --arms, or after --)"  # when argparse took one for a name


def arm_overrides(name: str, custom: dict[str, list[str]]) -> list[str]:
    if name in custom:
        return custom[name]
    if name in PRESETS:
        return [f"method.preset={name}"]
    if name in TERMS:
        return [f"method.terms=[{name}]"]
    hint = OVERRIDES_HINT if "=" in name else ""
    raise SystemExit(
        f"unknown arm '{name}': a preset ({', '.join(PRESETS)}), a term ({', '.join(TERMS)}), or --arm{hint}"
    )


# --- which runs can be reused ---------------------------------------------------------------------


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        elif f"{prefix}{key}" not in _UNKEYED:
            out[f"{prefix}{key}"] = value
    return out


def request(config: Path, overrides: list[str]) -> dict:
    """What a run is asked to be: its resolved config (less the unkeyed fields) and the stamp of its data
    (the synthetic sets' generator parameters and hash), so that a run is reused only for the same both."""
    cfg = load_config(config, overrides)
    stamp = Path(cfg.data.root) / STAMP
    return {"config": _flat(config_to_dict(cfg)), "data": json.loads(stamp.read_text()) if stamp.is_file() else None}


def differences(run_dir: Path, wanted: dict) -> list[str]:
    """How a run dir's config (and data) differ from `wanted`; [] when it can be reused or resumed."""
    saved = run_dir / REQUEST_FILE
    if saved.is_file():
        have = json.loads(saved.read_text())
    elif (run_dir / CONFIG_FILE).is_file():  # written before requests were recorded: its config alone
        have = {"config": _flat(yaml.safe_load((run_dir / CONFIG_FILE).read_text())), "data": wanted["data"]}
    else:
        return []
    # A field added after the run was trained is taken at its default: a new option's default keeps the
    # behaviour that came before it.
    recorded = _flat(config_to_dict(Config())) | {k: v for k, v in have["config"].items() if k not in _UNKEYED}
    keys = sorted(set(recorded) | set(wanted["config"]))
    diff = [
        f"{k}: {recorded.get(k)!r} -> {wanted['config'].get(k)!r}"
        for k in keys
        if recorded.get(k) != wanted["config"].get(k)
    ]
    if have["data"] != wanted["data"]:
        diff.append(f"data: {(have['data'] or {}).get('hash')} -> {(wanted['data'] or {}).get('hash')}")
    return diff


def claim(run_dir: Path, wanted: dict) -> None:
    """Make `run_dir` a run of `wanted`: a run trained (or begun) for another config or other data is moved
    aside (`<dir>.stale-N`, nothing is deleted) and said so, so that it is trained again."""
    if diff := differences(run_dir, wanted):
        n = 1 + sum(1 for _ in run_dir.parent.glob(f"{run_dir.name}.stale-*"))
        stale = run_dir.with_name(f"{run_dir.name}.stale-{n}")
        run_dir.rename(stale)
        log = run_dir.with_suffix(".log")
        if log.is_file():
            log.rename(stale.with_suffix(".log"))
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        print(
            f"[{run_dir.parent.name}/{run_dir.name}] asked for another config than it was trained with "
            f"({shown}): trained again (the old run is kept in {stale})",
            flush=True,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REQUEST_FILE).write_text(json.dumps(wanted, indent=1))


# --- training ------------------------------------------------------------------------------------


def command(config: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    if (run_dir / CHECKPOINT_FILE).is_file():  # begun for this very request (`claim`)
        return [sys.executable, "-m", "train", "--resume", str(run_dir)]
    args = ["--config", str(config), "--run-dir", str(run_dir), f"name={run_dir.parent.name}", *overrides]
    return [sys.executable, "-m", "train", *args]


def waits_for(overrides: list[str]) -> Path | None:
    """The run a run needs finished before it starts (its `method.offline_run`), or None."""
    runs = [o.partition("=")[2] for o in overrides if o.startswith("method.offline_run=")]
    return Path(runs[-1]) if runs and runs[-1] not in ("", "null") else None


def startable(todo: list[tuple[Path, list[str]]]) -> int | None:
    """The first run of `todo` whose offline run (if any) has finished."""
    for i, (_, overrides) in enumerate(todo):
        if (needed := waits_for(overrides)) is None or (needed / METRICS_FILE).is_file():
            return i
    return None


def train_all(runs: list[tuple[Path, list[str]]], config: Path, jobs: int) -> list[Path]:
    """Train the runs not finished yet, `jobs` at a time, a run that distils from another once that one has
    finished; returns the run dirs that failed (or could not start)."""
    todo = [(d, o) for d, o in runs if not (d / METRICS_FILE).is_file()]
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running: dict[Path, tuple[subprocess.Popen, float]] = {}
    failed = []
    print(f"{len(runs) - len(todo)} of {len(runs)} runs done before; {len(todo)} to train, {jobs} at a time")
    while todo or running:
        while todo and len(running) < jobs and (i := startable(todo)) is not None:
            run_dir, overrides = todo.pop(i)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(run_dir.with_suffix(".log"), "a") as log:
                proc = subprocess.Popen(command(config, run_dir, overrides), stdout=log, stderr=log, env=env)
            running[run_dir] = (proc, time.monotonic())
            print(f"[{run_dir.parent.name}/{run_dir.name}] training ({run_dir.with_suffix('.log')})", flush=True)
        time.sleep(1)
        for run_dir, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run_dir]
            name, took = f"{run_dir.parent.name}/{run_dir.name}", f"{(time.monotonic() - started) / 60:.1f} min"
            if proc.returncode:
                failed.append(run_dir)
                print(f"[{name}] failed (exit {proc.returncode}) after {took}", flush=True)
            else:
                print(f"[{name}] done in {took}", flush=True)
        if todo and not running and startable(todo) is None:  # what they wait for failed
            for run_dir, overrides in todo:
                print(f"[{run_dir.parent.name}/{run_dir.name}] not started: {waits_for(overrides)} did not finish")
                failed.append(run_dir)
            todo = []
    return failed


# --- reading a finished run ----------------------------------------------------------------------


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run as (step, value) pairs (a resumed run's overlap purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_run(run_dir: Path, iterations: int) -> dict:
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    tb = scalars(run_dir)
    late = lambda tag: [v for step, v in tb.get(tag, []) if step > iterations / 2]  # noqa: E731
    terms = {}
    for tag in tb:
        key = tag.removeprefix("train/")
        logged = key.startswith(("ratio_", "region_", "pixel_", "one_", *TERMS))
        if tag.startswith("train/") and logged and late(tag):
            terms[key] = statistics.fmean(late(tag))
    test = metrics.get("test")
    return {
        "val": {m: metrics[m]["miou"] for m in MODELS},
        "test_best": {m: test["best"][m]["miou"] for m in MODELS} if test else None,
        "test_last": {m: test["last"][m]["miou"] for m in MODELS} if test else None,
        "test_best_iou": {m: test["best"][m]["iou"] for m in MODELS} if test else None,
        "best_iteration": {m: metrics[m]["iteration"] for m in ("cnn", "vit")},
        "curve": {m: tb.get(f"val/{m}/miou", []) for m in MODELS},
        "terms": terms,
    }


# --- the report ----------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(results: dict, arm: str, base: str, key: str) -> dict[str, list] | None:
    """Per model, the per-seed differences arm - base (percentage points) over the seeds both have;
    for per-class keys, one list of class differences per seed."""
    seeds = [s for s in results[arm] if s in results.get(base, {}) and results[arm][s][key] and results[base][s][key]]
    if not seeds or arm == base:
        return None

    def diff(a, b):
        return (
            100 * (a - b)
            if not isinstance(a, list)
            else [diff(x, y) if None not in (x, y) else None for x, y in zip(a, b, strict=True)]
        )

    return {m: [diff(results[arm][s][key][m], results[base][s][key][m]) for s in seeds] for m in MODELS}


def fmt(values: list[float], signed: bool = False) -> str:
    mean, sd = mean_sd(values)
    if not signed:
        return f"{mean:.2f} ± {sd:.2f}"
    lo, hi = ci95(values)
    return f"{mean:+.2f} ± {sd:.2f} [{lo:+.2f}, {hi:+.2f}] (min {min(values):+.2f})"


def table(header: list[str], rows: list[list[str]], align: str = "---:") -> list[str]:
    """Markdown table lines; the first column left-aligned."""
    line = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    return [line(header), "|---|" + "|".join([align] * (len(header) - 1)) + "|", *map(line, rows)]


# The method's targets (benchmarks/results/ablation-complementary.md): over the first baseline (`independent`)
# a paired mean of at least +1.0 point for every model and no seed below -0.5; over any other baseline (the
# tuned DML, the random-selection control) +0.5.
TARGETS = {"first": (1.0, -0.5), "other": (0.5, None)}


def helps(p: dict[str, list[float]], target: tuple[float, float | None]) -> bool:
    gain, floor = target
    return all(statistics.fmean(p[m]) >= gain and (floor is None or min(p[m]) >= floor) for m in MODELS)


def target_text(target: tuple[float, float | None]) -> str:
    gain, floor = target
    return f"≥ +{gain:.1f} mean" + (f", ≥ −{-floor:.1f} every seed" if floor is not None else "")


def term_rows(results: dict) -> list[list[str]]:
    """Per arm and distillation term: value, gradient ratios and direction shares (mean over seeds)."""
    rows = []
    for arm, runs in results.items():
        logged: dict[str, list[float]] = {}
        for r in runs.values():
            for k, v in r["terms"].items():
                logged.setdefault(k, []).append(v)
        mean = {k: statistics.fmean(v) for k, v in logged.items()}
        one_right = f"{mean['one_right']:.3f}" if "one_right" in mean else "-"
        for term in (t for t in TERMS if t in mean):
            kind = term.split("_")[0]
            shares = [f"{kind}_vit_to_cnn", f"{kind}_cnn_to_vit"]
            if f"{term}_kept_cnn" in mean:  # a pseudo-label term: the shares of unlabelled pixels each is taught
                shares = [f"{term}_kept_cnn", f"{term}_kept_vit"]
            keys = [f"ratio_{term}_cnn", f"ratio_{term}_vit", *shares]
            cells = (f"{mean[k]:.2f}" if k in mean else "-" for k in keys)
            rows.append([arm, term, f"{mean[term]:.4f}", *cells, one_right])
    return rows


def machine(device: str) -> str:
    """What trained the runs: the GPU (and its host's CPU) where they ran on one, else the CPU."""
    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__} (host CPU {cpu_model()})"
    return cpu_model()


def pair_of(arm: str, custom: dict[str, list[str]]) -> str:
    """The arm's `method.pair` (`mixed`: a CNN and a ViT)."""
    pairs = [o.partition("=")[2] for o in arm_overrides(arm, custom) if o.startswith("method.pair=")]
    return pairs[-1] if pairs else "mixed"


def header(results: dict, args, cfg, data: dict | None) -> list[str]:
    d = cfg.data
    seeds = sorted({s for r in results.values() for s in r})
    split = d.test_split or d.eval_split
    command = " ".join(shlex.quote(a) for a in args.argv)
    arms = "; ".join(f"`{a}`: {' '.join(arm_overrides(a, args.custom)) or '(config)'}" for a in results)
    data_line = f"format {data['format']}, parameters hash `{data['hash']}`" if data and "hash" in data else "-"
    return [
        f"# Method comparison on {d.root}: {split} mIoU (%), {len(seeds)} paired seeds",
        "",
        f"- Command: `python -m benchmarks.ablation {command}`",
        f"- Seeds {', '.join(map(str, seeds))}: **{args.purpose}** seeds",
        f"- Budget per run: {cfg.iterations} iterations, batch {d.batch_size}, crop {d.crop_size[0]}x{d.crop_size[1]}; "
        f"checkpoints picked on `{d.eval_split}` every {cfg.eval_interval} iterations, numbers from `{split}`",
        f"- Data: {data_line}",
        f"- Machine: {machine(cfg.device)}, {args.jobs} run(s) at a time; {datetime.date.today()}"
        if not args.report_only
        else f"- Tabulated with --report-only on {datetime.date.today()}: each run's log says where it trained",
        f"- Arms: {arms}",
        *[
            f"- `{a}` trains two {pair.upper()}s (method.pair={pair}): its other column is the second {pair.upper()}"
            for a in results
            if (pair := pair_of(a, args.custom)) != "mixed"
        ],
        "",
    ]


def model_tables(results: dict, baselines: list[str], key: str, title: str) -> list[str]:
    """Mean ± SD per arm, then the paired Δ to each baseline with its 95 % interval and worst seed."""
    rows = [[arm, *(fmt([100 * r[key][m] for r in runs.values()]) for m in MODELS)] for arm, runs in results.items()]
    lines = [f"## {title}: mean ± SD over seeds", "", *table(["arm", "CNN", "ViT", "ensemble"], rows)]
    for i, base in enumerate(dict.fromkeys(baselines)):
        target = TARGETS["other" if i else "first"]
        deltas = [(arm, p) for arm in results if (p := paired(results, arm, base, key))]
        if deltas:
            rows = [[arm, *(fmt(p[m], True) for m in MODELS), "yes" if helps(p, target) else "no"] for arm, p in deltas]
            head = ["arm", "ΔCNN", "ΔViT", "Δensemble", target_text(target)]
            lines += ["", f"Paired Δ to `{base}` (points; mean ± SD [95 % CI, t] over seeds, worst seed):", ""]
            lines += table(head, rows)
    return [*lines, ""]


def class_deltas(results: dict, base: str, names: list[str]) -> list[str]:
    """Per arm and student, the paired per-class IoU Δ to `base` (test, best weights), mean over seeds."""
    rows = []
    for arm in results:
        p = paired(results, arm, base, "test_best_iou")
        for m in MODELS if p else ():
            per_class = [[seed[k] for seed in p[m] if seed[k] is not None] for k in range(len(names))]
            rows.append([f"{arm} {m}", *(f"{statistics.fmean(v):+.2f}" if v else "-" for v in per_class)])
    if not rows:
        return []
    return [
        f"## Per-class IoU Δ to `{base}` (test, best weights; mean over seeds)",
        "",
        *table(["arm, model", *names], rows),
        "",
    ]


def group_mean(iou: list[float | None], names: list[str], group: list[str]) -> float:
    """Mean IoU (points) over a group of classes (a class absent from the split counts 0)."""
    check_classes(group, names)
    return 100 * statistics.fmean(iou[names.index(c)] or 0.0 for c in group)


def class_names(data: DataConfig) -> list[str]:
    return LAYOUTS[data.format](Path(data.root), data.train_split)[1].names


def check_classes(group: list[str], names: list[str]) -> None:
    if unknown := [c for c in group if c not in names]:
        raise SystemExit(f"unknown classes {unknown}: the dataset has {', '.join(names)}")


def group_tables(results: dict, base: str, names: list[str], groups: dict[str, list[str]]) -> list[str]:
    """Per arm, model and group of classes: the group's mean IoU (test, best weights) over seeds, and its
    paired Δ to `base` with its 95 % interval and worst seed."""
    if not groups:
        return []
    iou = lambda arm, seed, m, g: group_mean(results[arm][seed]["test_best_iou"][m], names, groups[g])  # noqa: E731
    rows = []
    for arm, runs in results.items():
        for m in MODELS:
            seeds = [s for s in runs if s in results.get(base, {})] if arm != base else []
            means = [fmt([iou(arm, s, m, g) for s in runs]) for g in groups]
            deltas = [
                fmt([iou(arm, s, m, g) - iou(base, s, m, g) for s in seeds], True) if seeds else "-" for g in groups
            ]
            rows.append([f"{arm} {m}", *means, *deltas])
    head = ["arm, model", *groups, *(f"Δ {g} to `{base}`" for g in groups)]
    lines = [f"## Groups of classes: mean IoU (test, best weights) and the paired Δ to `{base}`", ""]
    lines += [f"- {g}: {', '.join(classes)}" for g, classes in groups.items()]
    return [*lines, "", *table(head, rows), ""]


def per_seed(results: dict) -> list[str]:
    def triple(r: dict | None) -> str:
        return " / ".join(f"{100 * r[m]:.2f}" for m in MODELS) if r else "-"

    def at(r: dict) -> str:
        return " / ".join(str(r["best_iteration"][m]) for m in ("cnn", "vit"))

    rows = [
        [arm, str(seed), triple(r["test_best"]), triple(r["test_last"]), triple(r["val"]), at(r)]
        for arm, runs in results.items()
        for seed, r in sorted(runs.items())
    ]
    head = ["arm", "seed", "test best CNN / ViT / ens", "test last", "val best", "best at it. CNN / ViT"]
    return ["## Per seed", "", *table(head, rows, "---")]


def report(results: dict, args, cfg, names: list[str], data: dict | None, left_out: list[str]) -> str:
    split = cfg.data.test_split or cfg.data.eval_split
    lines = header(results, args, cfg, data)
    if left_out:
        lines[-1:-1] = [f"- Left out: {', '.join(left_out)}"]
    titles = {"test_best": "best weights (picked on val)", "test_last": "last weights (final iteration)"}
    for key, title in titles.items():
        if any(r[key] for runs in results.values() for r in runs.values()):
            lines += model_tables(results, args.baselines, key, f"{split}, {title}")
    lines += class_deltas(results, args.baselines[0], names)
    lines += group_tables(results, args.baselines[0], names, args.groups)
    lines += per_seed(results)
    if terms := term_rows(results):
        lines += [
            "",
            "## Distillation terms over the second half of training (mean over seeds)",
            "",
            "Value: the weighted term in the loss. Ratio: its gradient norm over CE's at the tensor it acts on",
            "(HFD: the distilled encoder stages; region BSD: the decoder feature; pixel BSD, DML: the logits).",
            "Shares: of the regions / pixels where the ViT teaches the CNN (→CNN) and the CNN the ViT (→ViT); for a "
            "pseudo-label term, of the unlabelled pixels each student is taught.",
            "One right: the share of labelled training pixels exactly one student gets right.",
            "",
            *table(["arm", "term", "value", "ratio CNN", "ratio ViT", "→CNN", "→ViT", "one right"], terms),
        ]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        for arm, runs in results.items():
            curves = [dict(r["curve"][model]) for r in runs.values() if r["curve"][model]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [100 * statistics.fmean(c[s] for c in curves) for s in steps], label=arm)
        ax.set(title=f"{model}: val mIoU, mean over seeds", xlabel="iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ablation", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", type=Path, default=Path("configs/synthetic.yaml"))
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--arms", nargs="+", default=None, help=f"presets or terms (default: {' '.join(DEFAULT_ARMS)})")
    p.add_argument("--arm", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (cores are split between them)")
    p.add_argument(
        "--baselines",
        "--baseline",
        nargs="+",
        default=None,
        help="arms every other arm is compared with, seed by seed (default: independent and dml where they "
        "run, else the first arm); "
        "the first is the reference: its target is +1.0 with no seed below -0.5, the others' +0.5; "
        "per class and per group, arms are compared with the first",
    )
    p.add_argument(
        "--group",
        nargs="+",
        action="append",
        default=[],
        metavar=("NAME", "CLASS"),
        help="a named group of classes whose mean IoU is reported per arm (e.g. --group shapes disc square)",
    )
    p.add_argument("--report-only", action="store_true", help="tabulate the finished runs; train nothing")
    p.add_argument(
        "--purpose",
        default="reporting",
        help="what these seeds serve, written in the report: tuning (candidates "
        "are chosen on them) or reporting (nothing is chosen on them)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides applied to every arm (e.g. iterations=3000)")
    return p


def planned_runs(args, arms: list[str]) -> list[tuple[Path, list[str]]]:
    """(run dir, overrides) of every arm and seed, seed by seed (paired runs finish together); each arm's
    method options are checked before any run trains."""

    def filled(override: str, seed: int) -> str:
        return override.replace("{seed}", str(seed)).replace("{out}", str(args.out))

    runs = [
        (
            args.out / arm / f"seed{seed}",
            [*args.overrides, *(filled(o, seed) for o in arm_overrides(arm, args.custom)), f"seed={seed}"],
        )
        for seed in args.seeds
        for arm in arms
    ]
    for run_dir, overrides in runs:
        arm_cfg = load_config(args.config, overrides)
        widths = tuple(slot_config(arm_cfg, slot).decoder_channels for slot in ("cnn", "vit"))
        try:
            method_terms(arm_cfg.method, Geometry(tuple(arm_cfg.data.crop_size), widths))
        except ConfigError as e:
            raise SystemExit(f"arm '{run_dir.parent.name}': {e}") from None
    return runs


def finished(runs: list[tuple[Path, list[str]]], wanted: list[dict]) -> tuple[dict[str, list[int]], list[str]]:
    """Per arm, the seeds whose run has finished for the config asked for; and the runs left out, with why."""
    done: dict[str, list[int]] = {}
    left_out = []
    for (run_dir, _), want in zip(runs, wanted, strict=True):
        name = f"{run_dir.parent.name}/{run_dir.name}"
        if not (run_dir / METRICS_FILE).is_file():
            left_out.append(f"{name} (not finished)")
        elif diff := differences(run_dir, want):
            left_out.append(f"{name} (trained for another config: {'; '.join(diff[:4])})")
        else:
            done.setdefault(run_dir.parent.name, []).append(int(run_dir.name.removeprefix("seed")))
    return done, left_out


REPORT_FILES = ("table.md", "results.json", "curves.png")


def write_report(args, runs: list[tuple[Path, list[str]]], wanted: list[dict], cfg) -> None:
    """table.md, results.json and curves.png over the seeds on which every arm with a finished run has one
    (the comparison stays paired while runs are missing); the runs left out are listed in it."""
    done, left_out = finished(runs, wanted)
    seeds = [s for s in args.seeds if done and all(s in have for have in done.values())]
    left_out += [
        f"{arm}/seed{s} (a seed not every arm has finished)" for arm in done for s in done[arm] if s not in seeds
    ]
    for line in left_out:
        print(f"left out of the report: {line}")
    if not seeds:
        for name in REPORT_FILES:  # an older report must not pass for this one
            (args.out / name).unlink(missing_ok=True)
        print("no seed has a finished run of every arm: no report written")
        return
    results = {arm: {seed: read_run(args.out / arm / f"seed{seed}", cfg.iterations) for seed in seeds} for arm in done}
    first = args.out / next(iter(done)) / f"seed{seeds[0]}"
    names = yaml.safe_load((first / CONFIG_FILE).read_text())["data"]["class_names"]
    text = report(results, args, cfg, names, wanted[0]["data"], left_out)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(results, args.out / "curves.png")
    print(text)


def check_request(cli: argparse.ArgumentParser, args, arms: list[str], cfg) -> None:
    """What the report is asked for, checked before anything trains."""
    if unknown := [b for b in args.baselines or () if b not in arms]:
        cli.error(f"--baselines: {unknown[0]!r} is not an arm ({', '.join(arms)}){OVERRIDES_HINT}")
    args.baselines = args.baselines or [b for b in ("independent", "dml") if b in arms] or arms[:1]
    args.groups = {}
    for name, *classes in args.group:
        if not classes or name in args.groups:
            cli.error(f"--group {name}: a new name, then the group's classes")
        args.groups[name] = classes
    if args.groups and not cfg.data.test_split:
        cli.error("--group: groups are reported on the test split, and data.test_split is not set")
    names = class_names(cfg.data) if args.groups and not args.report_only else None
    for group in args.groups.values() if names else ():
        try:
            check_classes(group, names)
        except SystemExit as e:
            cli.error(f"--group: {e}{OVERRIDES_HINT}")


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.custom = {name: shlex.split(overrides) for name, overrides in args.arm}
    arms = list(dict.fromkeys((args.arms or ([] if args.custom else DEFAULT_ARMS)) + list(args.custom)))
    for arm in arms:
        arm_overrides(arm, args.custom)  # unknown names fail before anything trains
    if args.jobs < 1:
        cli.error("--jobs must be >= 1")
    cfg = load_config(args.config, args.overrides)
    check_request(cli, args, arms, cfg)
    runs = planned_runs(args, arms)
    wanted = [request(args.config, overrides) for _, overrides in runs]
    failed = []
    if not args.report_only:
        for (run_dir, _), want in zip(runs, wanted, strict=True):
            claim(run_dir, want)
        failed = train_all(runs, args.config, args.jobs)
    write_report(args, runs, wanted, cfg)
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(str(d) for d in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
