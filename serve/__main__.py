"""Start the Gradio demo on a run's engine dirs.

python -m serve --engines runs/<name>/export [--host 127.0.0.1] [--port 7860] [--max-pixels N]
    [--max-file-size 25mb] [--max-queue 64] [--concurrency 1] [--threads 0] [--examples DIR]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from serve.images import DEFAULT_MAX_PIXELS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", required=True, type=Path, help="a run's export dir (holding cnn/ and vit/)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are refused")
    parser.add_argument("--max-file-size", default="25mb", help="upload limit, e.g. 25mb")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond this are refused")
    parser.add_argument("--concurrency", type=int, default=1, help="requests run at once (1: each gets every core)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per request (0: one per core)")
    parser.add_argument("--examples", type=Path, help="example images (default: ENGINES/examples)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from serve.app import Demo, build_app  # imports gradio: keep --help fast

    try:
        demo = Demo(args.engines, args.max_pixels, args.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(demo, args.examples)
    app.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop (docker stop, kill) closes it cleanly
    app.launch(server_name=args.host, server_port=args.port, max_file_size=args.max_file_size, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
