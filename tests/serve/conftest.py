from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

MAX_PIXELS = 1_000_000  # the test server's limit, small enough to cross cheaply

EXIF_ORIENTATION = 0x0112


def bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per kind of input the server must refuse with a readable message."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    files = {
        "not an image": ("notes.png", b"hello, this is text"),
        "truncated": ("truncated.png", data[: len(data) // 2]),
        "empty": ("empty.png", b""),
    }
    out = {}
    for kind, (name, payload) in files.items():
        (folder / name).write_bytes(payload)
        out[kind] = folder / name
    Image.new("RGB", (1, 1)).save(folder / "one-pixel.png")
    out["1x1"] = folder / "one-pixel.png"
    Image.new("L", (1200, 1000)).save(folder / "over-limit.png")  # 1.2 MP: over the tests' 1 MP limit
    out["over the pixel limit"] = folder / "over-limit.png"
    Image.new("L", (15000, 12000)).save(folder / "bomb.png")  # 180 MP in ~200 KB
    out["decompression bomb"] = folder / "bomb.png"
    return out


def convertible_inputs(folder: Path) -> dict[str, Path]:
    """Images in modes the server converts to RGB, and a photo that EXIF says to rotate."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    images = {
        "grayscale": Image.fromarray(rgb[..., 0]),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "16-bit": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "palette": Image.fromarray(rgb).convert("P"),
    }
    out = {}
    for kind, im in images.items():
        out[kind] = folder / f"{kind}.png"
        im.save(out[kind])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 64 wide, 48 high; shown rotated: 48 wide, 64 high
    out["exif-rotated"] = folder / "exif-rotated.jpg"
    Image.fromarray(rgb).save(out["exif-rotated"], exif=exif)
    return out


@pytest.fixture(scope="session")
def engines(exported_run) -> Path:
    return exported_run / "export"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(engines, tmp_path_factory):
    """`python -m serve` on the shared export, with small limits so the tests can cross them."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--engines", str(engines), "--port", str(port),
         "--max-pixels", str(MAX_PIXELS), "--max-file-size", "1mb", "--max-queue", "32"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
