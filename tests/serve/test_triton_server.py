"""A real Triton Inference Server (PyTriton's) on the shared export and on the model repository export.triton
writes, queried with tritonclient and plain HTTP; an engine and repository models that cannot load among them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from benchmarks.soak import free_port
from export.triton import RepositoryOptions, write_repository
from serve.backends import usable
from serve.runtime import open_engine
from serve.segmenter import choices, load_segmenter
from serve.triton_server import model_name
from tests.conftest import REPO

TRITON_PYTHON = REPO / ".venv" / "triton" / "bin" / "python"  # `make serve-triton` / `make test` make it
MAX_SIDE = 256
TOKEN = "test-token"
BROKEN_ENGINE = ("cnn", "ort.cpu.fp16")  # its file truncated in the server's copy of the export


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.fixture(scope="module")
def served(engines, tmp_path_factory) -> dict[str, Path]:
    """What the server loads: a copy of the export with one engine file broken, and the model repository
    of its fp32 engines for Triton's Python backend with two models that cannot load added: an ONNX Runtime
    backend model (no such backend in PyTriton's server) and one whose ONNX file is broken."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(engines, root / "export")
    truncate(root / "export" / "cnn" / "model.fp16.onnx")
    repository = root / "repository"
    write_repository(engines, repository, RepositoryOptions(variants=("fp32",), cpu_only=True, python_backend=True))
    write_repository(engines, root / "native", RepositoryOptions(io=("labels",), variants=("fp32",), cpu_only=True))
    for source, name in ((root / "native" / "cnn_fp32", "cnn_fp32_ort"), (repository / "vit_fp32", "vit_broken")):
        shutil.copytree(source, repository / name)
        config = repository / name / "config.pbtxt"
        config.write_text(config.read_text().replace(f'name: "{source.name}"', f'name: "{name}"'))
    truncate(repository / "vit_broken" / "1" / "model.onnx")
    return {"export": root / "export", "repository": repository}


@pytest.fixture(scope="module")
def triton(served, tmp_path_factory):
    if not TRITON_PYTHON.exists():
        pytest.skip(f"{TRITON_PYTHON} is missing: make serve-triton (or make test) creates it")
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    log_path = tmp_path_factory.mktemp("triton") / "server.log"
    # PyTriton's workspaces (a copy of the server per start) hold its IPC sockets, whose paths must stay under
    # 108 characters: a short dir, not pytest's
    home = Path(tempfile.mkdtemp(prefix="pytriton-", dir="/tmp"))
    process = subprocess.Popen(
        [str(TRITON_PYTHON), "-m", "serve.triton_server", "--engines", str(served["export"]),
         "--models", "cnn", "ensemble", "--repository", str(served["repository"]),
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
         "--metrics-port", str(ports["metrics"]), "--max-side", str(MAX_SIDE), "--access-token", TOKEN],
        cwd=REPO, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTRITON_HOME": str(home)},
    )  # fmt: skip
    # PyTriton's server is up before the models are bound; serve.triton_server says when all are
    ready = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
    deadline = time.monotonic() + 300
    while True:
        try:
            if "Triton: HTTP" in log_path.read_text() and urllib.request.urlopen(ready, timeout=2).status == 200:
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the Triton server did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    yield {"process": process, "ports": ports, "log": log_path, "home": home}
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=60)
    shutil.rmtree(home, ignore_errors=True)


def infer(ports: dict, model: str, images: np.ndarray, datatype: str = "UINT8", output: str = "labels") -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
    request = grpcclient.InferInput("image", list(images.shape), datatype)
    request.set_data_from_numpy(images)
    return client.infer(model, [request]).as_numpy(output)


def ready(ports: dict, model: str) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/models/{model}/ready").status == 200
    except urllib.error.HTTPError:
        return False


def pixels(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_every_model_answers_like_the_local_segmenter(triton, served):
    """One Triton model per (model, backend) this host runs, each equal to the local segmenter."""
    ports, engines = triton["ports"], served["export"]
    offered = [(m, b.name) for m, b in choices(engines, usable())]
    expected = [c for c in offered if c[0] in ("cnn", "ensemble") and c != BROKEN_ENGINE]
    assert ("cnn", "ov.fp32") in expected and ("ensemble", "ort.cpu.fp32") in expected
    images = pixels(2, 45, 77)
    for model, backend in expected:
        name = model_name(model, backend)
        assert ready(ports, name), f"{name} is not ready:\n{triton['log'].read_text()[-3000:]}"
        local = load_segmenter(engines, model, backend).predict_batch(list(images))
        got = infer(ports, name, images)
        assert got.shape == (2, 45, 77) and got.dtype == np.uint8
        assert (got == np.stack([p.labels for p in local])).mean() >= 0.999, name
    for alias in ("cnn", "ensemble"):  # the fastest of each, under the model's own name
        assert infer(ports, alias, images).shape == (2, 45, 77)


def test_an_engine_that_cannot_load_is_named_and_the_others_serve(triton):
    model, backend = BROKEN_ENGINE
    assert not ready(triton["ports"], model_name(*BROKEN_ENGINE))
    log = triton["log"].read_text()
    assert f"{model} on {backend} cannot run here" in log and "model.fp16.onnx: ONNX Runtime cannot open" in log


def test_the_generated_repository_serves_like_the_local_engines(triton, served, engines):
    """export.triton's repository (Python backend) in the same server: the students, their logits and the
    Triton ensemble (preprocess, both logits models, combine) equal to the local engines and segmenter."""
    ports = triton["ports"]
    images = pixels(2, 48, 64, seed=2)  # inside the engines' profile: repository models run the engine as is
    for model in ("cnn", "vit", "ensemble"):
        name = f"{model}_fp32"
        assert ready(ports, name), f"{name} is not ready:\n{triton['log'].read_text()[-3000:]}"
        local = np.stack([p.labels for p in load_segmenter(engines, model, "ort.cpu.fp32").predict_batch(list(images))])
        assert (infer(ports, name, images) == local).mean() >= 0.999, name
    normalised = infer(ports, "ensemble_preprocess", images, output="normalised")
    logits = infer(ports, "vit_fp32_logits", normalised.astype(np.float32), "FP32", output="logits")
    np.testing.assert_allclose(logits, open_engine(engines / "vit", "fp32", "logits").run(normalised), atol=1e-4)


def test_repository_models_that_cannot_load_are_named_and_the_others_serve(triton, served):
    ports, log = triton["ports"], triton["log"].read_text()
    repository = served["repository"]
    assert f"{repository}: model cnn_fp32_ort failed to load" in log and "backend 'onnxruntime'" in log
    assert f"{repository}: model vit_broken failed to load" in log and "INVALID_PROTOBUF" in log
    assert not ready(ports, "cnn_fp32_ort") and not ready(ports, "vit_broken")
    assert ready(ports, "vit_fp32")  # the model vit_broken was copied from
    urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/ready")  # the server itself is ready


def test_plain_http_and_the_metrics(triton):
    ports = triton["ports"]
    images = pixels(1, 32, 40, seed=1)
    body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                        "data": images.ravel().tolist()}]}  # fmt: skip
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports['http']}/v2/models/cnn/infer", data=json.dumps(body).encode(), method="POST"
    )
    answer = json.loads(urllib.request.urlopen(request).read())
    labels = np.array(answer["outputs"][0]["data"], dtype=np.uint8).reshape(answer["outputs"][0]["shape"])
    np.testing.assert_array_equal(labels, infer(ports, "cnn", images))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics").read().decode()
    assert 'nv_inference_request_success{model="cnn"' in metrics


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: pixels(1, 32, 40).astype(np.float32), id="wrong dtype"),
        pytest.param(lambda: pixels(1, 32, 40)[..., :2], id="two channels"),
        pytest.param(lambda: pixels(1, 32, 40)[:0], id="empty batch"),
        pytest.param(lambda: pixels(1, MAX_SIDE + 8, 40), id="over the limit"),
    ],
)
def test_a_bad_request_is_answered_with_an_error_and_the_next_one_succeeds(triton, bad):
    from tritonclient.utils import InferenceServerException

    images = bad()
    with pytest.raises(InferenceServerException):
        infer(triton["ports"], "cnn", images, "FP32" if images.dtype == np.float32 else "UINT8")
    assert infer(triton["ports"], "cnn", pixels(1, 32, 40)).shape == (1, 32, 40)


def test_the_load_check_drives_triton_and_reads_its_statistics(triton, tmp_path):
    from benchmarks.load import main as load

    out = tmp_path / "load.json"
    args = ["--triton", f"127.0.0.1:{triton['ports']['grpc']}", "--model", "cnn", "--clients", "3", "--seconds", "2",
            "--size", "40", "56", "--triton-token", TOKEN, "--json", str(out)]  # fmt: skip
    assert load(args) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["requests"] >= 3 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["server_ms"]["compute_infer"] > 0 and r["server_ms"]["queue"] is not None


def test_a_busy_port_is_named_instead_of_hanging(triton, tmp_path):
    busy = str(triton["ports"]["grpc"])
    command = [str(TRITON_PYTHON), "-m", "serve.triton_server", "--engines", str(tmp_path), "--grpc-port", busy]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"port {busy} is in use (--grpc-port)" in done.stderr


def test_the_server_stops_cleanly(triton):
    process = triton["process"]
    process.terminate()
    assert process.wait(timeout=60) == 0  # SIGTERM stops it like Ctrl+C: a clean exit
    deadline = time.monotonic() + 60  # tritonserver and its Python-backend stubs wind down after it
    pgrep = ["pgrep", "-s", str(process.pid)]
    while leftovers := subprocess.run(pgrep, capture_output=True, text=True, timeout=30).stdout.split():
        assert time.monotonic() < deadline, f"processes left in the server's session: {leftovers}"
        time.sleep(1)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{triton['ports']['http']}/v2/health/ready", timeout=2)
    assert "Traceback" not in Path(triton["log"]).read_text().split("Triton: HTTP")[0]
    assert not list(triton["home"].glob("workspace_*")), "PyTriton's workspace was left behind"


def test_a_missing_export_dir_is_named(tmp_path):
    if not TRITON_PYTHON.exists():
        pytest.skip(f"{TRITON_PYTHON} is missing")
    done = subprocess.run(
        [str(TRITON_PYTHON), "-m", "serve.triton_server", "--engines", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, env={**os.environ}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "nope: no such export dir" in done.stderr
    done = subprocess.run(
        [str(TRITON_PYTHON), "-m", "serve.triton_server", "--repository", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and f"{tmp_path}: not a model repository" in done.stderr


def test_without_pytriton_the_fix_is_named(tmp_path):
    """The project's main environment (numpy 2) has no PyTriton: the command says how to get it."""
    command = [sys.executable, "-m", "serve.triton_server", "--engines", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nvidia-pytriton" in done.stderr and "make serve-triton" in done.stderr
