"""Load check of a running server: N concurrent users for T seconds, of the Gradio app or of Triton.

python -m benchmarks.load [--url http://127.0.0.1:7860/] [--clients 16] [--seconds 60]
    [--image PATH | --size 512 1024] [--model cnn] [--backend ort.cpu.fp32] [--json FILE]
python -m benchmarks.load --triton 127.0.0.1:8001 --model cnn_ort_cpu_fp32 [--clients 16] [--seconds 60]

Each client sends requests back to back (the app's /segment with gradio_client, or a Triton model's
gRPC infer with tritonclient). Prints requests/s, latency percentiles as a client sees them and the
errors by message; for Triton also its own mean queue and compute time per request over the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from serve.backends import legacy


class Refused(Exception):
    """A deliberate bad request that got its clear refusal: counted by kind, apart from the errors."""


@dataclass
class Drive:
    """What the clients saw: each answered request as (seconds after the clock started, latency s), the
    deliberate bad requests refused as expected and the errors, both by message, the seconds the window
    lasted and the seconds the clients took to connect."""

    answered: list[tuple[float, float]] = field(default_factory=list)
    refused: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    elapsed: float = 0.0
    connect: float = 0.0

    @property
    def latencies(self) -> list[float]:
        return [latency for _, latency in self.answered]


def _message(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def drive(clients: int, seconds: float, make_sender) -> Drive:
    """`clients` threads, each calling its own `make_sender(i)()` back to back for `seconds`; a sender raises
    `Refused` for a bad request refused as it should be. The clock starts when every client is ready (a
    slow handshake does not eat the window)."""
    result = Drive()
    lock = threading.Lock()
    clock = [0.0, 0.0]  # start, deadline
    began = time.perf_counter()

    def ready() -> None:  # the last client to arrive starts the clock, before any is released
        clock[0] = time.perf_counter()
        clock[1] = clock[0] + seconds

    start = threading.Barrier(clients + 1, action=ready)

    def user(i: int) -> None:
        try:
            send = make_sender(i)
        except Exception as e:  # the server refused even the handshake
            with lock:
                result.errors[f"connect: {e}"[:200]] += 1
            start.wait()
            return
        start.wait()
        while (sent := time.perf_counter()) < clock[1]:
            try:
                send()
            except Refused as e:
                with lock:
                    result.refused[_message(e)] += 1
                continue
            except Exception as e:
                with lock:
                    result.errors[_message(e)] += 1
                continue
            with lock:
                result.answered.append((sent - clock[0], time.perf_counter() - sent))

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    result.connect = clock[0] - began
    for t in threads:
        t.join()
    result.elapsed = time.perf_counter() - clock[0]
    return result


def summary(run: Drive) -> dict:
    ms = 1e3 * np.array(run.latencies) if run.answered else np.zeros(1)
    return {
        "connect_s": round(run.connect, 2),
        "seconds": round(run.elapsed, 2),
        "requests": len(run.answered),
        "requests_per_s": len(run.answered) / run.elapsed,
        **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)},
        "max_ms": float(ms.max()),
        "errors": sum(run.errors.values()),
        "error_messages": dict(run.errors),
    }


def run_load(url, clients, seconds, images, model="cnn", backend="ort.cpu.fp32") -> dict:
    """The Gradio app's /segment. `images`: one path per client (or one for all)."""
    from gradio_client import Client, handle_file

    images = images if len(images) == clients else [images[0]] * clients
    # Not Gradio's default /tmp/gradio: on the server's own machine that is the server's cache, and
    # a client rewriting a file there while the server streams it truncates other responses. The
    # client also leaves an empty temp dir per download: both go with this dir.
    with tempfile.TemporaryDirectory(prefix="load-") as downloads:
        tempfile.tempdir, previous = downloads, tempfile.tempdir

        def make_sender(i: int):
            client = Client(url, verbose=False, download_files=downloads)
            upload = handle_file(str(images[i]))
            return lambda: client.predict(upload, model, backend, 0.5, api_name="/segment")

        try:
            result = summary(drive(clients, seconds, make_sender))
        finally:
            tempfile.tempdir = previous
    return {"url": url, "clients": clients, "model": model, "backend": backend, **result}


def run_triton_load(url: str, clients: int, seconds: float, images: list[Path], model: str, token=None) -> dict:
    """A Triton model over gRPC (`url` host:port): each client sends its image as one uint8 request.
    With the server's access token, adds Triton's own statistics of the run: mean queue and compute
    time per request."""
    import tritonclient.grpc as grpcclient

    from serve.triton_server import GRPC_TOKEN_HEADER

    arrays = [np.asarray(Image.open(p).convert("RGB"))[None] for p in images]
    arrays = arrays if len(arrays) == clients else [arrays[0]] * clients

    def make_sender(i: int):
        client = grpcclient.InferenceServerClient(url)
        request = grpcclient.InferInput("image", list(arrays[i].shape), "UINT8")
        request.set_data_from_numpy(arrays[i])
        return lambda: client.infer(model, [request]).as_numpy("labels")

    def stats() -> dict:
        if not token:
            return {}
        headers = {GRPC_TOKEN_HEADER: token}
        found = grpcclient.InferenceServerClient(url).get_inference_statistics(model, headers=headers, as_json=True)
        return found["model_stats"][0]["inference_stats"] if found.get("model_stats") else {}

    before = stats()
    result = summary(drive(clients, seconds, make_sender))
    after = stats()

    def mean_ms(key: str) -> float | None:
        count = int(after.get(key, {}).get("count", 0)) - int(before.get(key, {}).get("count", 0))
        ns = int(after.get(key, {}).get("ns", 0)) - int(before.get(key, {}).get("ns", 0))
        return ns / count / 1e6 if count else None

    server = {k: mean_ms(k) for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    return {"url": url, "clients": clients, "model": model, **result, "server_ms": server}


def _random_images(count: int, folder: Path, size: tuple[int, int]) -> list[Path]:
    paths = []
    for i in range(count):
        paths.append(folder / f"client-{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--image", type=Path, help="one image for every client (default: a 512x1024 random RGB image each)"
    )
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--backend", default="ort.cpu.fp32", help="a backend of the app (serve.backends.BACKENDS)")
    parser.add_argument("--precision", help="with a runtime name as --backend (earlier versions' flags)")
    parser.add_argument(
        "--triton", metavar="HOST:PORT", help="drive a Triton server's gRPC (make serve-triton) instead"
    )
    parser.add_argument("--triton-token", default=os.environ.get("TRITON_ACCESS_TOKEN"), help="for its statistics")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    # Distinct images: Gradio caches outputs by content hash, and identical outputs of concurrent
    # requests rewrite one cached file while it is being sent (see the note in README, Serve).
    with tempfile.TemporaryDirectory(prefix="load-images-") as folder:
        images = [args.image] if args.image else _random_images(args.clients, Path(folder), tuple(args.size))
        if args.triton:
            r = run_triton_load(args.triton, args.clients, args.seconds, images, args.model, args.triton_token)
        else:
            backend = legacy(args.precision, args.backend).name if args.precision else args.backend
            r = run_load(args.url, args.clients, args.seconds, images, args.model, backend)
    print("| clients | connect s | seconds | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['clients']} | {r['connect_s']:.1f} | {r['seconds']:.1f} | {r['requests']} | {r['requests_per_s']:.2f} "
        f"| {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['errors']} |"
    )
    if "server_ms" in r:
        print("Triton, mean per request: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["server_ms"].items() if v))
    for message, count in r["error_messages"].items():
        print(f"error x{count}: {message}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
