"""Speed decisions that do not flip with timing noise: engines timed in interleaved rounds, and a ratio
with its 95 % interval against a stated rule (torch-free: export and serve both decide with it).

On a shared machine one timing is noise: the same command gave a 1.36x and a 4x int8 speed-up on the same
engines. So A and B are timed in turn, round after round (drift hits both alike), the per-round ratios
give a mean and a t interval, and a rule of the form "B ships when it is at least `threshold` x faster
than A" is decided on the interval: above it ships, below it does not, and an interval that straddles the
threshold keeps A (the tie rule: the float engine stays, the more accurate one), whatever the point estimate.
A ratio near its threshold is timed for more rounds (up to MAX_ROUNDS) until its interval falls on one side, so
that the same engines give the same decision from export to export.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Two-sided 95 % quantiles of Student's t by degrees of freedom 1..30 (beyond: the normal's 1.96).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
ROUNDS = 7  # interleaved rounds per comparison
MAX_ROUNDS = 28  # the most a comparison gets while its interval straddles its threshold
CALLS = 3  # calls per engine per round (its median is that round's time)


def ci95(values: list[float]) -> tuple[float, float]:
    """The 95 % confidence interval of the mean (t, n - 1 degrees of freedom); nan for one value."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * sd / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class Speedup:
    """How many times faster B ran than A, from interleaved rounds (the geometric mean of per-round ratios)."""

    ratio: float
    low: float  # its 95 % interval
    high: float
    rounds: int
    a_ms: float  # medians over all rounds
    b_ms: float


def speedup_of(a_ms: list[float], b_ms: list[float]) -> Speedup:
    """From the per-round times of A and B (ms, same length): ratios on a log scale, where a ratio's noise
    is symmetric."""
    logs = [math.log(a / b) for a, b in zip(a_ms, b_ms, strict=True)]
    low, high = ci95(logs)
    mean = statistics.fmean(logs)
    return Speedup(math.exp(mean), math.exp(low), math.exp(high), len(logs), statistics.median(a_ms),
                   statistics.median(b_ms))  # fmt: skip


def interleaved(runs: dict[str, Callable[[np.ndarray], object]], batch: np.ndarray, rounds: int = ROUNDS,
                calls: int = CALLS, settled: Callable[[dict[str, list[float]]], bool] | None = None,
                max_rounds: int = MAX_ROUNDS) -> dict[str, list[float]]:  # fmt: skip
    """Per-round median latency (ms) of each run, timed in turn within every round (each warmed up first). With
    `settled`, `rounds` more rounds follow while it is false of the times so far, up to `max_rounds` in all."""
    for run in runs.values():
        run(batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    while True:
        for _ in range(rounds):
            for name, run in runs.items():
                samples = []
                for _ in range(calls):
                    started = time.perf_counter()
                    run(batch)
                    samples.append(1e3 * (time.perf_counter() - started))
                times[name].append(statistics.median(samples))
        done = len(next(iter(times.values()), []))
        if not runs or settled is None or done + rounds > max_rounds or settled(times):
            return times


@dataclass(frozen=True)
class Verdict:
    """A keep-or-drop decision with the numbers that made it (recorded in the manifest's `decisions`)."""

    ship: bool
    rule: str
    outcome: str  # clears, below, straddles (kept out by the tie rule)
    speedup: dict

    def record(self, **extra) -> dict:
        return {"ship": self.ship, "rule": self.rule, "outcome": self.outcome, **self.speedup, **extra}


def at_least(speedup: Speedup, threshold: float) -> Verdict:
    """B ships when its interval clears `threshold`; below it, or straddling it, A stays (the tie rule)."""
    rule = f"ships when the 95% interval of its speed-up is above {threshold}x (straddling: not shipped)"
    if speedup.low >= threshold:
        outcome = "clears"
    elif speedup.high < threshold:
        outcome = "below"
    else:
        outcome = "straddles"
    return Verdict(outcome == "clears", rule, outcome, asdict(speedup))
