"""A real Triton Inference Server on this host, through PyTriton: the torch-free segmenter as Triton models.

python -m serve.triton_server --engines runs/<name>/export [--models cnn vit ensemble] [--http-port 8000]
    [--grpc-port 8001] [--metrics-port 8002] [--queue-delay-us 2000] [--max-side 4096] [--access-token T]
    [--repository runs/<name>/triton]

One Triton model per (model, backend) this host runs, named `<model>_<backend>` with the backend's dots as
underscores (`cnn_ort_cpu_fp32`, `ensemble_ov_bf16`, ...), plus `<model>` for the fastest of them (timed at
start, as the app does). Each takes a batch of uint8 RGB images `image` [N, H, W, 3] and returns the class
maps `labels` [N, H, W] uint8 at the input size; Triton batches requests of one shape dynamically, up to the
engines' max batch. HTTP/REST and gRPC follow KServe v2 (`/v2/health/ready`, `/v2/models/<name>/infer`),
Prometheus metrics on the metrics port. The server binary is the one in the `nvidia-pytriton` wheel.

`--repository DIR` also loads the models of a Triton model repository (`python -m export.triton
--python-backend --cpu`: this server has Triton's Python backend, not its ONNX Runtime or TensorRT ones).
A model that fails to load is logged with Triton's reason; the others are served.

PyTriton pins numpy < 2, so it lives in its own environment (`make serve-triton` makes `.venv/triton`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np

from serve.backends import BACKENDS
from serve.manifest import IO_SPECS
from serve.segmenter import MODELS, Segmenter, auto_choice, timed_segmenters
from serve.slide import Sliding, slide, sliding

log = logging.getLogger(__name__)

INPUT, OUTPUT = IO_SPECS["labels"]["input"]["name"], IO_SPECS["labels"]["output"]["name"]
GRPC_TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"  # the admin endpoints' token, over gRPC


def model_name(model: str, backend: str) -> str:
    return f"{model}_{backend.replace('.', '_')}"


def class_maps(segmenter: Segmenter, images: np.ndarray, max_side: int, windows: Sliding | None = None) -> np.ndarray:
    """A batch of same-shape images to their class maps, fitted or by sliding windows (`windows`); a bad batch
    raises a ValueError that names what is wrong."""
    if images.shape[0] == 0 or 0 in images.shape[1:3]:
        raise ValueError(f"{INPUT}: empty batch or image {images.shape}")
    if max(images.shape[1:3]) > max_side:
        raise ValueError(f"{INPUT}: {images.shape[1]}x{images.shape[2]} is over the {max_side} pixel limit")
    fits = windows is None or min(images.shape[1] - segmenter.min_hw[0], images.shape[2] - segmenter.min_hw[1]) < 0
    if fits:
        return np.stack([p.labels for p in segmenter.predict_batch(list(images))])
    return np.stack([slide(segmenter, image, windows).labels for image in images])


def infer_function(segmenter: Segmenter, max_side: int, windows: Sliding | None = None):
    """PyTriton's inference callable: a batch of same-shape images in, their class maps out. An error
    here answers that request only; the model goes on serving."""
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {OUTPUT: class_maps(segmenter, inputs[INPUT], max_side, windows)}

    return infer


def segmenters(engines: Path, models: list[str], scores: bool = False) -> dict[str, Segmenter]:
    """Every (model, backend) this host runs, by Triton name, plus each model's fastest (each engine opened
    once; one that cannot run here is logged and not served)."""
    found: dict[str, Segmenter] = {}
    for model in models:
        timed = timed_segmenters(engines, model, scores=scores)
        for backend, (segmenter, _) in timed.items():
            found[model_name(model, backend)] = segmenter
        backend, _, how = auto_choice(engines, model, [BACKENDS[b] for b in timed])  # the rule every command shares
        found[model] = timed[backend][0]
        log.info("%s: the fastest here is %s (%s)", model, backend, how)
    return found


def check_repository(grpc_url: str, repository: Path, token: str) -> list[str]:
    """The models of `repository` that Triton loaded at start (PyTriton loads them all; an ensemble needs
    its steps). One that failed is logged with Triton's reason, and the others are served."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    index = client.get_model_repository_index(headers={GRPC_TOKEN_HEADER: token}, as_json=True).get("models", [])
    states = {m["name"]: (m.get("state", "UNAVAILABLE"), m.get("reason", "")) for m in index}
    loaded = []
    for name in sorted(config.parent.name for config in repository.glob("*/config.pbtxt")):
        state, reason = states.get(name, ("UNAVAILABLE", "not in the server's repository index"))
        if state == "READY":
            loaded.append(name)
            log.info("serving %s from %s", name, repository)
        else:
            reason = reason.split("\n\nAt:")[0]  # the Python backend appends the stub's traceback
            reason = reason or f"{state} (no reason given, e.g. an unreadable config: Triton's log above says why)"
            log.error("%s: model %s failed to load: %s", repository, name, reason)
    return loaded


def serve(engines: Path | None, models: list[str], args: argparse.Namespace) -> None:
    # PyTriton's Python-backend stub must load this interpreter's own libpython: without it, it finds the
    # system's (Debian's 3.11.2 beside pyenv's 3.11.7 here) and fails on the other stdlib.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    config = TritonConfig(
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        model_repository=args.repository.resolve() if args.repository else None,
        exit_timeout_secs=args.exit_timeout,
    )  # fmt: skip
    if args.repository:  # its models load at start: one that fails must neither stop the server nor unready it
        config.exit_on_error = config.strict_readiness = False
    # SIGTERM (docker stop, Kubernetes) stops like Ctrl+C: PyTriton then unloads the models and removes its
    # workspace (a copy of the server, ~20 MB per start under $PYTRITON_HOME); killed outright, it left them
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # PyTriton guards the admin endpoints (statistics, model repository, ...) with a token: a random
    # one unless given, so that only who started the server can read them
    security = TritonSecurityConfig(access_token=args.access_token)
    with Triton(config=config, security_config=security) as triton:
        for name, segmenter in (segmenters(engines, models, args.slide) if engines else {}).items():
            batches = [b for b in (1, 2, 4, 8, 16, 32) if b <= segmenter.max_batch]
            triton.bind(
                model_name=name,
                infer_func=infer_function(segmenter, args.max_side, sliding(segmenter) if args.slide else None),
                inputs=[Tensor(name=INPUT, dtype=np.uint8, shape=(-1, -1, 3))],
                outputs=[Tensor(name=OUTPUT, dtype=np.uint8, shape=(-1, -1))],
                config=ModelConfig(
                    max_batch_size=segmenter.max_batch,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=args.queue_delay_us, preferred_batch_size=batches
                    ),
                ),
                strict=True,
            )
            log.info("serving %s (max batch %d)", name, segmenter.max_batch)
        if args.repository:
            check_repository(f"127.0.0.1:{args.grpc_port}", args.repository, security.access_token)
        print(
            f"Triton: HTTP :{args.http_port}, gRPC :{args.grpc_port}, metrics :{args.metrics_port}/metrics",
            flush=True,
        )
        triton.serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.triton_server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", type=Path, help="a run's export dir")
    parser.add_argument("--repository", type=Path, help="a model repository to load too (export.triton's)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--queue-delay-us", type=int, default=2000, help="dynamic batching's wait for more requests")
    parser.add_argument("--max-side", type=int, default=4096, help="longer image sides are refused")
    parser.add_argument("--slide", action="store_true", help="every model slides windows of its serving size")
    parser.add_argument(
        "--exit-timeout",
        type=int,
        default=30,
        help="seconds a stop waits for requests in flight and models unloading (Triton's --exit-timeout-secs; a "
        "repository model whose reload failed holds every stop for all of it)",
    )
    parser.add_argument(
        "--access-token",
        default=os.environ.get("TRITON_ACCESS_TOKEN"),
        help="the token of the statistics and other admin endpoints (default: $TRITON_ACCESS_TOKEN, else random)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        import pytriton  # noqa: F401
    except ImportError:
        need = "the Triton server needs nvidia-pytriton, which pins numpy < 2: make serve-triton makes its environment"
        print(f"error: {need} (or pip install 'segdeploy[cpu,openvino,triton]' in a venv of its own)", file=sys.stderr)
        return 2
    if not (args.engines or args.repository):
        parser.error("give --engines, --repository or both")
    if args.engines and not args.engines.is_dir():
        print(f"error: {args.engines}: no such export dir (python -m export --run RUN first)", file=sys.stderr)
        return 2
    if args.repository and not any(args.repository.glob("*/config.pbtxt")):
        need = "python -m export.triton --run RUN --cpu --python-backend writes one"
        print(f"error: {args.repository}: not a model repository (no <model>/config.pbtxt; {need})", file=sys.stderr)
        return 2
    # tritonserver exits on a busy port but PyTriton then waits forever: say it before starting
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    for flag, port in ports.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                print(f"error: port {port} is in use ({flag}): stop what serves there or pick another", file=sys.stderr)
                return 2
    serve(args.engines, args.models, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
