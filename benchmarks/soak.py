"""Soak and fault benchmark of the long-lived parts: hours under load, kills at random moments, two writers at once.

python -m benchmarks.soak --run runs/demo [--minutes 60] [--scenarios app triton predict export locks]
    [--images 2000] [--kills 3] [--export-kills 10] [--out benchmarks/results/soak-cpu.md]

Each scenario starts the part itself on the loopback, as a user would, and judges what it sees:
- `app`: the Gradio app (`python -m serve`), 8 clients through gradio_client for --minutes, sizes from 32x32 to
  2048x2048, every (model, backend) of the dropdown in turn, sliding windows on the large ones, one request in
  twenty an awkward file that must get its clear refusal.
- `triton`: `serve.triton_server` with the run's engines and a model repository of them (ensembles included),
  16 clients over HTTP and gRPC for --minutes; halfway one repository model's file is corrupted and the model
  reloaded: that model answers with Triton's error, every other keeps serving.
- `predict`: `serve.predict` over --images images, SIGKILLed --kills times at random moments and started again
  with the same command: it must end with every output identical to an uninterrupted run's, no half file, and
  no finished image computed twice.
- `export`: the export SIGKILLed --export-kills times at random moments: after each kill the engine dir holds a
  complete set whose manifest matches its files and which serves; the last export, left to finish, goes live.
- `locks`: a second export of the run and a second training into one run dir while the first runs: refused at
  start, naming the first; the first export goes on to finish.

The report (markdown, --out) has a row per scenario: requests, refusals and errors by kind, p50/p99 latency per
window (a sixth of --minutes: 10 min in an hour), RSS and open file descriptors of the server's processes after
the first twelfth of the run and at its end, what was lost, and the targets each row missed. A full disk is
checked by tests/test_disk_full.py (a tmpfs per case; root only). Exit 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.load import Drive, Refused, drive
from serve.host import cpu_model

REPO = Path(__file__).resolve().parents[1]
TRITON_PYTHON = REPO / ".venv" / "triton" / "bin" / "python"

# Awkward uploads and what their refusal must say (the tests send the same files)
AWKWARD = {
    "not an image": "not an image",
    "truncated": "truncated",
    "empty": "empty",
    "1x1": "too small",
    "over the pixel limit": "limit",
    "decompression bomb": "pixels",
}
RSS_GROWTH, FD_DRIFT, P99_GROWTH = 1.10, 5, 1.2  # the targets: end / warm RSS, +- open files, last / second p99


def awkward_files(folder: Path, max_pixels: int) -> dict[str, Path]:
    """One file per kind of AWKWARD, for a server refusing images over `max_pixels`."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    out = {"not an image": folder / "notes.png", "truncated": folder / "truncated.png", "empty": folder / "empty.png"}
    out["not an image"].write_bytes(b"hello, this is text")
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["empty"].write_bytes(b"")
    out["1x1"] = folder / "one-pixel.png"
    Image.new("RGB", (1, 1)).save(out["1x1"])
    side = int(max_pixels**0.5) + 100
    out["over the pixel limit"] = folder / "over-limit.png"
    Image.new("L", (side, side)).save(out["over the pixel limit"])
    out["decompression bomb"] = folder / "bomb.png"
    Image.new("L", (15000, 12000)).save(out["decompression bomb"])  # 180 MP in ~200 KB
    return out


@dataclass
class Row:
    scenario: str
    seconds: float = 0.0
    requests: int = 0
    refused: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    windows: list = field(default_factory=list)  # (p50 ms, p99 ms, requests) per window
    rss_mib: tuple = ()  # after the first twelfth, at the end
    fds: tuple = ()
    lost: int = 0
    notes: list = field(default_factory=list)

    def missed(self) -> list[str]:
        """The targets this row misses."""
        out = [f"{sum(self.errors.values())} errors"] if self.errors else []
        out += [f"{self.lost} lost"] if self.lost else []
        if self.rss_mib and self.rss_mib[1] > RSS_GROWTH * self.rss_mib[0]:
            out.append(f"RSS grew {self.rss_mib[1] / self.rss_mib[0]:.2f}x")
        if self.fds and abs(self.fds[1] - self.fds[0]) > FD_DRIFT:
            out.append(f"open files {self.fds[0]} -> {self.fds[1]}")
        p99 = [w[1] for w in self.windows if w[2]]
        if len(p99) >= 3 and p99[-1] > P99_GROWTH * p99[1]:
            out.append(f"p99 {p99[1]:.0f} -> {p99[-1]:.0f} ms")
        return out


class Watch:
    """RSS (MiB) and open file descriptors of a process and its descendants, sampled every `every` s."""

    def __init__(self, pid: int, every: float) -> None:
        self.root, self.every, self.samples = psutil.Process(pid), every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[float, float, int]:
        rss, fds = 0, 0
        for p in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # gone between the listing and the reading
                rss, fds = rss + p.memory_info().rss, fds + p.num_fds()
        return time.perf_counter(), rss / 2**20, fds

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(self._sample())

    def at(self, t: float) -> tuple[float, int]:
        """The last sample at or before `t` (perf_counter), else the first."""
        return next(((r, f) for s, r, f in reversed(self.samples) if s <= t), self.samples[0][1:])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())


def windows(run: Drive, seconds: float, count: int = 6) -> list[tuple[float, float, int]]:
    """p50, p99 (ms) and requests sent in each of `count` equal windows of the `seconds` of load."""
    width = seconds / count
    out = []
    for k in range(count):
        ms = [1e3 * lat for t, lat in run.answered if k * width <= t < (k + 1) * width]
        out.append((float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms)) if ms else (0.0, 0.0, 0))
    return out


def _loaded(run: Drive, row: Row, watch: Watch, started: float, seconds: float) -> Row:
    """Fill a load scenario's row from its drive and its watch: RSS and open files after the first twelfth of
    the `seconds` of load and at their end, while every client is still connected."""
    watch.stop()
    clock = started + run.connect
    (warm_rss, warm_fds), (end_rss, end_fds) = watch.at(clock + seconds / 12), watch.at(clock + seconds)
    row.seconds, row.requests = run.elapsed, len(run.answered)
    row.refused, row.errors, row.windows = dict(run.refused), dict(run.errors), windows(run, seconds)
    row.rss_mib, row.fds = (warm_rss, end_rss), (warm_fds, end_fds)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _wait_until(ready, process: subprocess.Popen, log: Path, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def sized_images(folder: Path, examples: Path, sizes: list[int], tint: int) -> list[Path]:
    """The export's first example image resized to each size (square and 4:3), tinted per client: distinct
    files for each client, as Gradio caches outputs by content."""
    base = Image.open(sorted(examples.glob("*.png"))[0]).convert("RGB")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for side in sizes:
        for h, w in ((side, side), (max(32, side * 3 // 4), side)):
            image = np.asarray(base.resize((w, h), Image.BILINEAR)).astype(np.int16)
            out.append(folder / f"{h}x{w}.png")
            Image.fromarray(np.clip(image + tint, 0, 255).astype(np.uint8)).save(out[-1])
    return out


APP_SIZES = [32, 64, 128, 256, 512, 1024, 2048]
APP_SLIDE_ABOVE = 1024  # larger sides go by sliding windows
APP_MAX_PIXELS = 8_000_000  # 2048x2048 fits, the awkward over-limit file does not


def soak_app(
    engines: Path,
    seconds: float,
    scratch: Path,
    clients: int = 8,
    sizes: list[int] = APP_SIZES,
    awkward_every: int = 20,
) -> Row:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from serve.segmenter import choices

    pairs = [(model, backend.name) for model, backend in choices(engines) if backend.device == "cpu"]
    awkward = awkward_files(scratch / "awkward", APP_MAX_PIXELS)
    port, log = free_port(), scratch / "app.log"
    command = [sys.executable, "-m", "serve", "--engines", str(engines), "--port", str(port)]
    command += ["--max-pixels", str(APP_MAX_PIXELS), "--max-queue", str(4 * clients)]
    server = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    tickets = itertools.count(1)  # every client's requests in one sequence: pairs in turn, one in N awkward

    def segment(client, path: Path, model: str, backend: str) -> None:
        h, w = (int(v) for v in path.stem.split("x"))
        args = (handle_file(str(path)), model, backend, 0.5, max(h, w) > APP_SLIDE_ABOVE)
        details = client.predict(*args, api_name="/segment")[4]
        if details["image_size"] != [h, w]:
            raise RuntimeError(f"answered {details['image_size']} for a {h}x{w} image")

    def refused(client, kind: str) -> None:
        try:
            client.predict(handle_file(str(awkward[kind])), "cnn", "ort.cpu.fp32", 0.5, False, api_name="/segment")
        except AppError as e:
            if AWKWARD[kind] in str(e):
                raise Refused(kind) from e
            raise RuntimeError(f"{kind}: refused without saying why: {e}") from e
        raise RuntimeError(f"{kind}: answered instead of refused")

    def make_sender(i: int):
        client = Client(url, verbose=False, download_files=str(scratch / "downloads" / str(i)))
        images, rng = sized_images(scratch / f"client{i}", engines / "examples", sizes, tint=3 * i), random.Random(i)

        def send():
            n = next(tickets)
            if n % awkward_every == 0:  # each kind in turn
                return refused(client, list(awkward)[(n // awkward_every) % len(awkward)])
            segment(client, rng.choice(images), *pairs[n % len(pairs)])

        return send

    try:
        _wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, server, log, "the app")
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:  # gradio_client's per-download temp dirs
            tempfile.tempdir, previous = tmp, tempfile.tempdir
            try:
                # Warm-up, outside the clock: each pair opens its engines once fitted and once by sliding windows
                # (just over the threshold: a 2048 px image takes a minute here), so the RSS after the first
                # twelfth is a served app's, not one still opening engines
                warm = Client(url, verbose=False, download_files=str(scratch / "downloads" / "warm"))
                slid = [APP_SLIDE_ABOVE + 64] if sizes[-1] > APP_SLIDE_ABOVE else []
                images = sized_images(scratch / "warm", engines / "examples", [sizes[0], *slid], tint=-5)[::2]
                for pair in pairs:
                    for path in images:
                        segment(warm, path, *pair)
                watch, started = Watch(server.pid, max(1.0, seconds / 120)), time.perf_counter()
                run = drive(clients, seconds, make_sender)
            finally:
                tempfile.tempdir = previous
        row = _loaded(run, Row("app"), watch, started, seconds)
        shown = f"sizes {sizes[0]}-{sizes[-1]} px, sliding windows above {APP_SLIDE_ABOVE}"
        row.notes.append(f"{clients} clients, {len(pairs)} (model, backend) pairs in turn, {shown}")
        row.notes.append(f"one request in {awkward_every} an awkward file; a warm-up of {len(pairs) * len(images)} "
                         "requests before the clock (each pair fitted and by sliding windows)")  # fmt: skip
        row.notes.append(f"the clients connected in {run.connect:.1f} s")
    finally:
        code = _stop(server)
    row.notes.append(f"the server stopped with exit code {code}")
    return row


TRITON_SIZES = [(64, 64), (96, 128), (240, 320), (480, 640)]


def _triton_repository(engines: Path, out: Path) -> Path:
    from export.triton import RepositoryOptions, write_repository

    write_repository(engines, out, RepositoryOptions(variants=("fp32",), cpu_only=True, python_backend=True))
    return out


def _triton_models(client, engines: Path, token: str, models: tuple[str, ...]) -> list[str]:
    """The models a user sends images to (image in, labels out): serve.triton_server's own, and the repository's
    (its ensembles' steps and logits models left out)."""
    from serve.segmenter import choices
    from serve.triton_server import GRPC_TOKEN_HEADER, model_name

    own = [*models, *(model_name(m, b.name) for m, b in choices(engines) if b.device == "cpu" and m in models)]
    repository = [
        m["name"] for m in client.get_model_repository_index(as_json=True, headers={GRPC_TOKEN_HEADER: token})["models"]
    ]
    served = []
    for name in [*own, *repository]:
        if client.is_model_ready(name):
            meta = client.get_model_metadata(name, as_json=True)
            if [i["name"] for i in meta["inputs"]] == ["image"] and [o["name"] for o in meta["outputs"]] == ["labels"]:
                served.append(name)
    return served


def soak_triton(
    engines: Path,
    seconds: float,
    scratch: Path,
    clients: int = 16,
    models: tuple[str, ...] = ("cnn", "vit", "ensemble"),
    exit_timeout: int = 30,
) -> Row:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from serve.triton_server import GRPC_TOKEN_HEADER

    if not TRITON_PYTHON.exists():
        return Row("triton", notes=[f"not run: {TRITON_PYTHON} is missing (make serve-triton creates it)"])
    repository = _triton_repository(engines, scratch / "repository")
    ports, token, log = {k: free_port() for k in ("http", "grpc", "metrics")}, "soak", scratch / "triton.log"
    home = Path(tempfile.mkdtemp(prefix="pytriton-", dir="/tmp"))  # its IPC socket paths must stay short
    command = [str(TRITON_PYTHON), "-m", "serve.triton_server", "--engines", str(engines), "--models", *models,
               "--repository", str(repository), "--access-token", token, f"--exit-timeout={exit_timeout}",
               *(f"--{k}-port={v}" for k, v in ports.items())]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "PYTRITON_HOME": str(home)})  # fmt: skip
    grpc_url, http_url = f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['http']}"
    try:
        ready = f"http://{http_url}/v2/health/ready"
        _wait_until(lambda: "Triton: HTTP" in log.read_text() and urllib.request.urlopen(ready).status == 200,
                    server, log, "the Triton server")  # fmt: skip
        served = _triton_models(grpcclient.InferenceServerClient(grpc_url), engines, token, models)
        broken = "vit_fp32"  # a repository model, corrupted halfway
        corrupted = threading.Event()
        watch, started = Watch(server.pid, max(1.0, seconds / 120)), time.perf_counter()

        def make_sender(i: int):
            module = grpcclient if i % 2 else httpclient
            client = module.InferenceServerClient(grpc_url if i % 2 else http_url)
            rng, turn = np.random.default_rng(i), [i]

            def send():
                turn[0] += 1
                model = served[turn[0] % len(served)]
                h, w = TRITON_SIZES[turn[0] % len(TRITON_SIZES)]
                image = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
                request = module.InferInput("image", list(image.shape), "UINT8")
                request.set_data_from_numpy(image)
                try:
                    labels = client.infer(model, [request]).as_numpy("labels")
                except Exception as e:
                    if model == broken and corrupted.is_set() and broken in str(e):
                        raise Refused(f"{broken} after its corruption: {str(e).splitlines()[0][:120]}") from e
                    raise
                if labels.shape != (1, h, w):
                    raise RuntimeError(f"{model}: labels {labels.shape} for a {h}x{w} image")
                if model == broken and corrupted.is_set():
                    answered_after[0] += 1

            return send

        def corrupt_halfway() -> None:
            time.sleep(seconds / 2)
            onnx = next((repository / broken).glob("*/model.onnx"))
            onnx.write_bytes(onnx.read_bytes()[:1000])
            corrupted.set()
            try:
                grpcclient.InferenceServerClient(grpc_url).load_model(broken, headers={GRPC_TOKEN_HEADER: token})
                reload.append("the reload succeeded")
            except Exception as e:
                reload.append(f"the reload failed: {str(e).splitlines()[0][:200]}")

        reload: list[str] = []
        answered_after = [0]  # by the corrupted model, after its reload
        fault = threading.Thread(target=corrupt_halfway, daemon=True)
        fault.start()
        run = drive(clients, seconds, make_sender)
        fault.join()
        row = _loaded(run, Row("triton"), watch, started, seconds)
        row.notes.append(f"{clients} clients (half HTTP, half gRPC) over {len(served)} models: {', '.join(served)}")
        row.notes.append(f"halfway {broken}'s model.onnx truncated and the model reloaded: {reload[0]}")
        row.notes.append(
            f"{broken} answered {answered_after[0]} requests after that, refused {sum(run.refused.values())}"
        )
    finally:
        stopping = time.perf_counter()
        code = _stop(server)
        shutil.rmtree(home, ignore_errors=True)
    row.notes.append(f"the server stopped with exit code {code} in {time.perf_counter() - stopping:.0f} s")
    return row


def _finished(command: list[str]) -> None:
    """Run `command` to its end; a failure raises with what it said."""
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=24 * 3600)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(command)} exited {done.returncode}: {done.stderr.strip()[-1000:]}")


def _killed_until_done(command: list[str], kills: int, progress, rng: random.Random, timeout: float) -> list[str]:
    """Run `command`, SIGKILL it `kills` times at random moments (`progress()` in [0, 1] paces the moments), then
    let it finish; returns what happened, a line per start."""
    said = []
    moments = sorted(rng.uniform(0.05, 0.95) for _ in range(kills))
    for moment in [*moments, None]:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while moment is not None and process.poll() is None and progress() < moment:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if moment is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
        stderr = process.communicate(timeout=timeout)[1].decode()
        said.append(f"exit {process.returncode}" + (f" (killed at {moment:.0%})" if moment is not None else ""))
        said[-1] += "".join(f"; {line}" for line in stderr.splitlines() if "already done" in line)
        if moment is None and process.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{stderr[-3000:]}")
    return said


def soak_predict(engines: Path, images: int, kills: int, scratch: Path, seed: int = 0) -> Row:
    from serve.predict import recorded

    folder = scratch / "images"
    rng = np.random.default_rng(seed)
    base = Image.open(sorted((engines / "examples").glob("*.png"))[0]).convert("RGB")
    for i in range(images):  # distinct images of a few sizes, in ten folders
        scale = rng.choice([0.25, 0.5, 0.75, 1.0])
        size = (max(64, int(base.width * scale)), max(64, int(base.height * scale)))
        image = np.asarray(base.resize(size, Image.BILINEAR)).astype(np.int16) + rng.integers(-20, 20)
        (folder / f"{i % 10}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i % 10}" / f"{i:05d}.png")
    args = ["-m", "serve.predict", "--engines", str(engines), "--model", "ensemble", "--overlay", str(folder)]
    straight, killed = scratch / "straight", scratch / "killed"
    started = time.perf_counter()
    _finished([sys.executable, *args, "--out", str(straight)])
    straight_s = time.perf_counter() - started
    results = killed / "predictions.jsonl"

    def lines() -> int:
        return results.read_text().count("\n") if results.is_file() else 0

    said = _killed_until_done([sys.executable, *args, "--out", str(killed)], kills, lambda: lines() / images,
                              random.Random(seed), timeout=10 * straight_s + 300)  # fmt: skip
    outputs = sorted(p.relative_to(straight) for p in straight.rglob("*.png"))
    differ = sum(
        not (killed / p).is_file() or not np.array_equal(np.asarray(Image.open(straight / p)),
                                                         np.asarray(Image.open(killed / p)))
        for p in outputs
    )  # fmt: skip
    half = list(killed.rglob(".*.tmp*"))
    computed = lines()  # a record line per output written: a finished image computed again writes it twice
    row = Row("predict", seconds=straight_s, requests=images, lost=differ + len(half))
    if computed != len(recorded(results)):
        row.errors[f"{computed - len(recorded(results))} outputs computed twice"] = 1
    row.notes.append(f"{images} images, uninterrupted {straight_s:.0f} s; {len(outputs)} outputs compared")
    row.notes.append("starts: " + " | ".join(said))
    return row


def soak_export(run_dir: Path, kills: int, scratch: Path, export_args: list[str], seed: int = 0) -> Row:
    from serve.segmenter import engine_dirs, load_segmenter

    out = scratch / "export"
    command = [sys.executable, "-m", "export", "--run", str(run_dir), "--out", str(out), *export_args]
    started = time.perf_counter()
    _finished(command)
    export_s = time.perf_counter() - started
    image = np.asarray(Image.open(sorted((out / "examples").glob("*.png"))[0]).convert("RGB"))
    students = list(engine_dirs(out))
    expected = {s: load_segmenter(out, s, "ort.cpu.fp32").predict(image).labels for s in students}
    rng, row, said, killed = random.Random(seed), Row("export", seconds=export_s), [], 0
    while True:  # the kills (a start that finishes before its kill is drawn again, earlier), then one left alone
        moment = rng.uniform(0.02, 0.9) * export_s if killed < kills and len(said) < 3 * kills else None
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = time.perf_counter()
        try:
            process.wait(timeout=moment if moment is not None else 24 * 3600)
            if moment is not None:  # it finished first (the first one ran on busier cores)
                export_s = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            killed += 1
        stderr = process.communicate()[1].decode()
        said.append(f"exit {process.returncode}" + (f" (kill due at {moment:.1f} s)" if moment is not None else ""))
        row.lost += _export_lost(out, students, image, expected, f"after start {len(said)}", row.errors)
        if moment is None:
            break
    if process.returncode:
        row.errors[f"the last export failed: {stderr.strip().splitlines()[-1:]}"] = 1
    row.requests = len(said)
    row.notes.append(f"uninterrupted {row.seconds:.0f} s: {shlex.join(export_args)}")
    row.notes.append("starts: " + ", ".join(said))
    return row


def _export_lost(out: Path, students: list[str], image: np.ndarray, expected: dict, when: str, errors: dict) -> int:
    """How many students' engine sets are not whole, or do not serve the labels they served before the kills."""
    from serve.manifest import read_manifest
    from serve.segmenter import load_segmenter

    lost = 0
    for s in students:
        try:
            manifest = read_manifest(out / s)
            missing = [e.file for e in manifest.engines if not (out / s / e.file).is_file()]
            same = np.array_equal(load_segmenter(out, s, "ort.cpu.fp32").predict(image).labels, expected[s])
            lost += bool(missing) or not same
        except Exception as e:
            lost += 1
            errors[f"{s} {when}: {e}"[:200]] = 1
    return lost


def soak_locks(run_dir: Path, scratch: Path, export_args: list[str]) -> Row:
    """A second export of one run, and a second training into one run dir, while the first runs."""
    row = Row("locks")
    out = scratch / "locked-export"
    first_cmd = [sys.executable, "-m", "export", "--run", str(run_dir), "--out", str(out), *export_args]
    copy = scratch / "locked-run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "bench", "triton", "predictions"))
    resume = [sys.executable, "-m", "train", "--resume", str(copy), "iterations=1000000", "checkpoint_interval=1"]
    for name, command, lock, busy in (("export", first_cmd, scratch / "locked-export.lock", "an export"),
                                      ("training", resume, copy / "train.lock", "training")):  # fmt: skip
        first = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until(lock.is_file, first, Path(os.devnull), f"the first {name}")
            second = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
            row.requests += 1
            if second.returncode == 2 and f"is busy: {busy} by pid {first.pid}" in second.stderr:
                row.refused[f"a second {name}"] = 1
            else:
                row.errors[f"a second {name}: exit {second.returncode}, {second.stderr.strip()[-200:]}"] = 1
            if first.poll() is not None:
                row.errors[f"the first {name} ended (exit {first.returncode}) when the second started"] = 1
            elif name == "export" and first.wait(timeout=24 * 3600):
                row.errors[f"the first export, with a second refused beside it, failed (exit {first.returncode})"] = 1
        finally:
            first.kill()
            first.wait()
    row.notes.append("the first export finished beside the refused second; the first training, endless, was stopped")
    return row


def markdown(rows: list[Row], command: str) -> str:
    lines = [
        "# Soak and faults",
        "",
        f"`{command}`",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()}; {datetime.date.today()}",
        f"- Targets: 0 errors other than deliberate bad inputs; RSS at the end <= {RSS_GROWTH}x after the first "
        f"twelfth; open files within +-{FD_DRIFT}; p99 in the last window <= {P99_GROWTH}x the second's; 0 lost",
        "",
        "| scenario | s | requests | refused as meant | errors | p50 / p99 ms per window | RSS MiB | open files "
        "| lost | missed |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---|",
    ]
    for r in rows:
        per = " · ".join(f"{p50:.0f}/{p99:.0f}" for p50, p99, n in r.windows) or "-"
        rss = f"{r.rss_mib[0]:.0f} → {r.rss_mib[1]:.0f}" if r.rss_mib else "-"
        fds = f"{r.fds[0]} → {r.fds[1]}" if r.fds else "-"
        missed = ", ".join(r.missed()) or "none"
        counts = f"{r.requests} | {sum(r.refused.values())} | {sum(r.errors.values())}"
        lines.append(f"| {r.scenario} | {r.seconds:.0f} | {counts} | {per} | {rss} | {fds} | {r.lost} | {missed} |")
    for r in rows:
        lines += ["", f"**{r.scenario}**: " + "; ".join(r.notes)] if r.notes else []
        lines += [f"- refused ×{n}: {k}" for k, n in r.refused.items()]
        lines += [f"- error ×{n}: {k}" for k, n in r.errors.items()]
    return "\n".join(lines) + "\n"


SCENARIOS = {  # name: the scenario, from the command line's options and a scratch dir of its own
    "app": lambda a, where: soak_app(a.run / "export", 60 * a.minutes, where),
    "triton": lambda a, where: soak_triton(a.run / "export", 60 * a.minutes, where),
    "predict": lambda a, where: soak_predict(a.run / "export", a.images, a.kills, where),
    "export": lambda a, where: soak_export(a.run, a.export_kills, where, shlex.split(a.export_args)),
    "locks": lambda a, where: soak_locks(a.run, where, shlex.split(a.export_args)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--run", type=Path, required=True, help="a trained and exported run dir (make demo's)")
    parser.add_argument("--minutes", type=float, default=60, help="of load, for the app and for Triton each")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), help="in order")
    parser.add_argument("--images", type=int, default=2000, help="serve.predict's folder")
    parser.add_argument("--kills", type=int, default=3, help="of serve.predict")
    parser.add_argument("--export-kills", type=int, default=10, help="of the export")
    parser.add_argument("--export-args", default="--no-size-sweep", help="the killed export's options")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak-cpu.md"), help="the report")
    args = parser.parse_args(argv)
    engines = args.run / "export"
    if not (engines / "cnn" / "manifest.json").is_file():
        parser.error(f"{args.run}: no engines under {engines} (make demo, or make export RUN={args.run})")
    rows = []
    command = "python -m benchmarks.soak " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        for name in args.scenarios:
            where = Path(scratch) / name
            where.mkdir()
            print(f"{name}...", file=sys.stderr, flush=True)
            try:
                rows.append(SCENARIOS[name](args, where))
            except Exception as e:  # the scenario could not run: its row says why, the others go on
                rows.append(Row(name, errors={f"the scenario failed: {e}"[:300]: 1}))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(markdown(rows, command))  # each row as soon as it is measured
            print(json.dumps(rows[-1].__dict__, default=str), file=sys.stderr, flush=True)
    print(markdown(rows, command))
    return 1 if any(r.missed() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
