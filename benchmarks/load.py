"""Load check of a running demo app: N concurrent gradio_client users for T seconds.

python -m benchmarks.load [--url http://127.0.0.1:7860/] [--clients 16] [--seconds 60]
    [--image PATH | --size 512 1024] [--model cnn] [--precision fp32] [--backend onnxruntime] [--json FILE]

Each client sends /segment requests back to back. Prints requests/s, latency percentiles (as a
client sees them: upload, queue, inference and download) and the errors, by message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def run_load(url, clients, seconds, images, model="cnn", precision="fp32", backend="onnxruntime") -> dict:
    """`images`: one path per client (or one for all)."""
    from gradio_client import Client, handle_file

    # Not Gradio's default /tmp/gradio: on the server's own machine that is the server's cache, and
    # a client rewriting a file there while the server streams it truncates other responses.
    downloads = tempfile.mkdtemp(prefix="load-")
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def user(image: Path) -> None:
        try:
            client = Client(url, verbose=False, download_files=downloads)
        except Exception as e:  # the server refused even the handshake
            with lock:
                errors[f"connect: {e}"[:200]] += 1
            start.wait()
            return
        start.wait()
        while time.perf_counter() < deadline[0]:
            sent = time.perf_counter()
            try:
                client.predict(handle_file(str(image)), model, precision, backend, 0.5, api_name="/segment")
            except Exception as e:
                with lock:
                    errors[str(e).splitlines()[0][:200] if str(e) else type(e).__name__] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - sent)

    images = images if len(images) == clients else [images[0]] * clients
    threads = [threading.Thread(target=user, args=(images[i],), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds  # set before the barrier releases the users
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    ms = 1e3 * np.array(latencies) if latencies else np.zeros(1)
    return {
        "url": url,
        "clients": clients,
        "seconds": round(elapsed, 2),
        "model": model,
        "precision": precision,
        "backend": backend,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "errors": sum(errors.values()),
        "error_messages": dict(errors),
    }


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
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    # Distinct images: Gradio caches outputs by content hash, and identical outputs of concurrent
    # requests rewrite one cached file while it is being sent (see the note in README, Serve).
    folder = Path(tempfile.mkdtemp(prefix="load-"))
    images = [args.image] if args.image else _random_images(args.clients, folder, tuple(args.size))
    r = run_load(args.url, args.clients, args.seconds, images, args.model, args.precision, args.backend)
    print("| clients | seconds | requests | requests/s | p50 ms | p99 ms | max ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['clients']} | {r['seconds']:.1f} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_ms']:.1f} "
        f"| {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['errors']} |"
    )
    for message, count in r["error_messages"].items():
        print(f"error x{count}: {message}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
