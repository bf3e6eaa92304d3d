from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny copy of the embedded dataset, written through the real generator."""
    from train.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, height=40, width=56, seed=1)


def tiny_run_args(data_root: Path, iterations: int = 6) -> list[str]:
    """Overrides that shrink configs/synthetic.yaml to seconds of CPU time."""
    return [
        f"iterations={iterations}",
        "eval_interval=3",
        "checkpoint_interval=2",
        "log_interval=1",
        f"data.root={data_root}",
        "data.crop_size=[32,32]",
        "data.batch_size=4",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "cnn.optimizer.lr=0.01",
        "method.preset=full",  # exercise every term, projectors included, end to end
    ]


def run_module(*args: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
