from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]


# The files pytest-xdist hands out first (`make test`: --dist loadfile --no-loadscope-reorder keeps this order):
# the one that builds the shared export (~2 min), then files that need no export, so that no worker waits for it.
FIRST = [
    "tests/export/test_export.py",
    "tests/train/test_losses.py",
    "tests/train/test_trainer.py",
    "tests/train/test_few_labels.py",
    "tests/benchmarks/test_ablation.py",
    "tests/train/test_pretrained.py",
    "tests/train/test_distributed.py",
]


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist workers share the cores: torch in each (and in the processes its tests start) takes its share
    of them, since OpenMP threads that outnumber the cores spin against each other (set before torch's import)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(FIRST)))  # stable: the rest as collected


@pytest.fixture(scope="session", autouse=True)
def _scratch_in_pytests_tmp(tmp_path_factory):
    """In-process temp files under pytest's own dir, which it prunes: gradio_client leaves an empty
    /tmp/<40 hex> dir behind for every file it downloads (thousands per test run)."""
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = None


@pytest.fixture(scope="session", autouse=True)
def _bytecode_shared_by_subprocesses(tmp_path_factory):
    """The Python processes the tests start (CLIs, servers, torchrun ranks: dozens) compile their imports once
    between them: with PYTHONDONTWRITEBYTECODE set and a venv installed --no-compile, each start otherwise
    compiles torch, timm and the rest from source again (~5 s of ~8). `make test` names a lasting folder
    (PYTHONPYCACHEPREFIX); a bare pytest gets one in its session's tmp dir, shared by its xdist workers."""
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        yield
        return
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPYCACHEPREFIX", str(built_once(tmp_path_factory, "pycache", Path.mkdir)))
        env.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _traces_shared_by_exports(tmp_path_factory):
    """The exports of one student's weights (most tests export the shared run) trace it once between them
    (export.graphs.cached_logits), in the session's dir rather than the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SEGDEPLOY_CACHE", str(built_once(tmp_path_factory, "cache", Path.mkdir)))
        yield


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` once per test session, by whichever pytest-xdist worker asks first (the others wait for it
    and share the result): a dir of the session's basetemp, which every worker's own basetemp lies in."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny copy of the embedded dataset, written through the real generator."""
    from train.data.synthetic import generate

    def build(root: Path) -> None:
        generate(root, num_train=16, num_val=4, height=40, width=56, seed=1, num_test=3)

    return built_once(tmp_path_factory, "synthetic", build)


def tiny_run_args(data_root: Path, iterations: int = 6, checkpoint_interval: int | None = None) -> list[str]:
    """Overrides that shrink configs/synthetic.yaml to seconds of CPU time; one checkpoint (~1 s), at the end,
    unless a test resumes from an earlier one."""
    return [
        f"iterations={iterations}",
        "eval_interval=3",
        f"checkpoint_interval={checkpoint_interval or iterations}",
        "log_interval=1",
        f"data.root={data_root}",
        "data.crop_size=[32,32]",
        "data.batch_size=4",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "cnn.optimizer.lr=0.01",
        "method.preset=full",  # exercise every term, projectors included, end to end
    ]


def run_module(*args: str, cwd: Path = REPO, env_extra: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m ARGS` in the repo, output captured; a command that hangs fails its test after `timeout` (600 s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    kwargs.setdefault("timeout", 600)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


def train_here(*args: str) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in this process, as `run_module` reports it (its exit code; its log and errors as
    stderr), without a new interpreter's ~9 s of imports. A test of the process itself (a SIGKILL, a lock held by
    a live process, torchrun, an environment read at import) starts a real one."""
    from train.__main__ import main

    err, root = io.StringIO(), logging.getLogger()
    handler, level, cwd = logging.StreamHandler(err), root.level, os.getcwd()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.chdir(REPO)  # relative paths as the CLI tests give them
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.chdir(cwd)
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["python", "-m", "train", *args], code, "", err.getvalue())


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """A finished (tiny) training run, shared by the export, serve and benchmark tests (never written to)."""

    def build(run_dir: Path) -> None:
        args = ["--config", str(REPO / "configs" / "synthetic.yaml"), "--run-dir", str(run_dir)]
        result = train_here(*args, *tiny_run_args(synthetic_root, iterations=8))
        assert result.returncode == 0, result.stderr[-3000:]

    return built_once(tmp_path_factory, "trained", build)


# Export settings small enough for tests; reduced precisions of an 8-iteration model get a looser agreement
# bar (its logits are nearly flat, so tiny quantisation noise flips classes, most at the gate's smallest size).
TEST_EXPORT_ARGS = [
    "--parity-images", "4",
    "--batch-sizes", "1", "3",
    "--calib-images", "4",
    "--max-batch", "4",
    "--reduced-agreement", "0.9",
]  # fmt: skip


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared run, exported with every precision variant (engine dirs under exported_run/export),
    gated at the serving size only: the gate's sweep over the profile's other sizes (OpenVINO compiles each shape,
    most of this export's time) is tested on its own exports in tests/export/test_export.py."""
    from export.__main__ import main

    def build(run_dir: Path) -> None:
        shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("checkpoint"))
        assert main(["--run", str(run_dir), *TEST_EXPORT_ARGS, "--no-size-sweep"]) == 0

    return built_once(tmp_path_factory, "exported", build)
