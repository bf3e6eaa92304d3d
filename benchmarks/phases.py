"""Run named shell commands in order and print how long each took: where `make demo`'s time goes.

python3 -m benchmarks.phases "install=make setup" "data=make data" ...

Standard library only: it runs before the project's environment exists (the install is a phase). Stops at
the first phase that fails, with its exit status, after printing the phases timed so far.
"""

from __future__ import annotations

import subprocess
import sys
import time


def run(phases: list[tuple[str, str]]) -> tuple[int, list[tuple[str, float]]]:
    """(exit status, [(phase, seconds)]) of the phases run, in order, until one fails."""
    timed = []
    for name, command in phases:
        started = time.perf_counter()
        code = subprocess.run(command, shell=True).returncode
        timed.append((name, time.perf_counter() - started))
        if code:
            return code, timed
    return 0, timed


def table(timed: list[tuple[str, float]]) -> str:
    total = sum(s for _, s in timed)
    rows = [f"| {name} | {s:.0f} | {f'{100 * s / total:.0f} %' if total else '-'} |" for name, s in timed]
    return "\n".join(["| phase | seconds | share |", "|---|---:|---:|", *rows, f"| total | {total:.0f} | |"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args):
        print(__doc__, file=sys.stderr)
        return 2
    code, timed = run([tuple(a.split("=", 1)) for a in args])
    print(f"\nWhere the time went{' (stopped: a phase failed)' if code else ''}:\n{table(timed)}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
