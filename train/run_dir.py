"""The run dir contract (README, "A run dir holds"): what `train/` writes and what later stages read back."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from train.checkpoint import load_weights
from train.config import STUDENTS as STUDENT_CONFIGS
from train.config import Config, ConfigError, load_config, slot_config

STUDENTS = tuple(STUDENT_CONFIGS)  # cnn, vit
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
IMPORTED_FILE = "imported.json"  # a run dir made from a model trained elsewhere (export.imported): its source
CHECKPOINT_FILE = Path("checkpoint") / "last.safetensors"


def weights_file(run_dir: Path, student: str) -> Path:
    return Path(run_dir) / f"{student}.safetensors"


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a run dir (no {CONFIG_FILE}): {run_dir}")
    cfg = load_config(path, overrides)
    if cfg.data.num_classes is None:
        raise ConfigError(f"{path}: data.num_classes is not set (was this written by `python -m train`?)")
    return cfg


def load_student(run_dir: str | Path, student: str, cfg: Config | None = None) -> nn.Module:
    """Rebuild one student from the run's config and load its best weights (eval mode, CPU)."""
    if student not in STUDENTS:
        raise ValueError(f"unknown student '{student}' (expected one of {', '.join(STUDENTS)})")
    from train.models import build_student  # timm: seconds to import, which a CLI's config error should not wait

    cfg = cfg or load_run_config(run_dir)
    model = build_student(slot_config(cfg, student), cfg.data.num_classes)
    path = weights_file(Path(run_dir), student)
    state, _ = load_weights(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the student in {Path(run_dir) / CONFIG_FILE}: {e}") from None
    return model.eval()


def load_students(run_dir: str | Path, cfg: Config | None = None) -> dict[str, nn.Module]:
    cfg = cfg or load_run_config(run_dir)
    return {name: load_student(run_dir, name, cfg) for name in STUDENTS}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RunBusy(RuntimeError):
    """Another process holds the lock of what this one would write."""


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process (a shared disk): assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError):
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def held(lock: Path, what: str) -> Iterator[None]:
    """One process at a time: `lock` is created exclusively and names the process (pid, host, command, since
    when); a second process is refused with those, and a lock whose process is gone is taken over."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([sys.executable, *sys.argv])}
    me["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder and _alive(holder):
                raise RunBusy(
                    f"{lock.parent} is busy: {what} by pid {holder.get('pid')} on {holder.get('host')} since "
                    f"{holder.get('since')} ({holder.get('command')}); wait for it to end, or stop it "
                    f"(the lock is {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # its process is gone (killed): take the lock over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RunBusy(f"{lock}: could not be taken")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
