"""Facts about the host that decisions depend on: which CPU this is (engines are timed and gated per CPU)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
