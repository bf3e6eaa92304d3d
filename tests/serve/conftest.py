from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.soak import awkward_files, free_port
from tests.conftest import REPO

MAX_PIXELS = 1_000_000  # the test server's limit, small enough to cross cheaply

EXIF_ORIENTATION = 0x0112


def bad_inputs(folder: Path) -> dict[str, Path]:
    """One file per kind of input the server must refuse with a readable message (benchmarks.soak.AWKWARD)."""
    return awkward_files(folder, MAX_PIXELS)


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


@pytest.fixture(scope="session")
def server(engines, tmp_path_factory):
    """`python -m serve` on the shared export, with small limits so the tests can cross them."""
    port = free_port()
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
