"""The Gradio demo as users meet it: a real server, driven by gradio_client and by a real browser."""

from __future__ import annotations

import gc
import shutil
import urllib.error
import urllib.request
from tempfile import TemporaryDirectory

import numpy as np
import pytest
from PIL import Image

from benchmarks.soak import AWKWARD
from serve.images import read_image
from serve.segmenter import load_segmenter
from tests.serve.conftest import MAX_PIXELS, bad_inputs, convertible_inputs

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    # Its own download dir: Gradio's default is the server's cache dir on this same machine.
    return Client(server, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _segment(client, path, model="cnn", backend="ort.cpu.fp32", opacity=0.5):
    return client.predict(handle_file(str(path)), model, backend, opacity, api_name="/segment")


def _good_image(folder) -> str:
    path = folder / "scene.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (44, 60, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_returns_the_runtime_class_map_overlay_legend_and_latency(client, engines, tmp_path):
    path = _good_image(tmp_path)
    overlay, class_map, class_file, legend, details, latency = _segment(client, path, "ensemble")
    labels = np.asarray(Image.open(class_file))
    expected = load_segmenter(engines, "ensemble").predict(read_image(path)).labels
    np.testing.assert_array_equal(labels, expected)
    assert np.asarray(Image.open(class_map)).shape == (44, 60, 3)
    present = {int(c) for c in np.unique(labels)}
    classes = details["classes"]
    assert {a["label"] for a in overlay["annotations"]} == {classes[c]["name"] for c in present}
    assert sum(c["share"] for c in classes) == pytest.approx(1.0)
    for c in present:
        assert classes[c]["share"] == pytest.approx((labels == c).mean())
        assert classes[c]["name"] in legend and classes[c]["color"] in legend
    assert set(details["timings_ms"]) == {"decode", "preprocess", "inference", "postprocess", "render"}
    assert details["image_size"] == [44, 60] and details["model"] == "ensemble"
    assert "inference" in latency and "ms" in latency


def test_overlay_colours_are_the_legends_dataset_palette(client, engines, tmp_path):
    overlay, _, class_file, _, details, _ = _segment(client, _good_image(tmp_path), opacity=1.0)
    colours = {c["name"]: c["color"] for c in details["classes"]}
    palette = load_segmenter(engines, "cnn").palette
    labels = np.asarray(Image.open(class_file))
    for annotation in overlay["annotations"]:
        mask = np.asarray(Image.open(annotation["image"]).convert("RGBA"))
        painted = mask[..., 3] > 0
        index = details["classes"][[c["name"] for c in details["classes"]].index(annotation["label"])]["index"]
        assert np.array_equal(painted, labels == index)
        rgb = {tuple(v) for v in mask[painted][:, :3].tolist()}
        assert rgb == {tuple(palette[index].tolist())}  # the overlay paints in the dataset's colour...
        assert colours[annotation["label"]] == "#{:02x}{:02x}{:02x}".format(*palette[index])  # ...the legend's


def test_predict_writes_what_the_app_answers(client, engines, tmp_path):
    from serve.predict import main as predict

    path = _good_image(tmp_path)
    class_file = _segment(client, path, "vit", "ort.cpu.fp16")[2]
    out = tmp_path / "out"
    args = ["--engines", str(engines), "--out", str(out), "--model", "vit", "--variant", "fp16", str(path)]
    assert predict(args) == 0
    assert np.array_equal(np.asarray(Image.open(out / "scene.png")), np.asarray(Image.open(class_file)))


def test_opacity_sets_the_overlay_alpha(client, tmp_path):
    path = _good_image(tmp_path)
    for opacity in (0.0, 0.8):
        overlay = _segment(client, path, opacity=opacity)[0]
        alpha = np.asarray(Image.open(overlay["annotations"][0]["image"]).convert("RGBA"))[..., 3]
        assert alpha.max() == round(255 * opacity)


def test_each_model_and_precision_present_is_served(client, engines, tmp_path):
    path = _good_image(tmp_path)
    for model in ("cnn", "vit", "ensemble"):
        for backend, precision in (("ort.cpu.fp16", "fp16"), ("ort.cpu.int8", "int8")):
            details = _segment(client, path, model, backend)[4]
            assert (details["model"], details["backend"], details["precision"]) == (model, backend, precision)
    with pytest.raises(gradio_client.exceptions.AppError, match="int4"):
        _segment(client, path, "cnn", "ort.cpu.int4")


def test_bad_inputs_get_a_message_and_the_next_request_still_succeeds(client, tmp_path):
    good = _good_image(tmp_path)
    for kind, path in bad_inputs(tmp_path / "bad").items():
        with pytest.raises(gradio_client.exceptions.AppError, match=AWKWARD[kind]):
            _segment(client, path)
        assert _segment(client, good)[4]["image_size"] == [44, 60], f"after {kind}"


def test_uploads_over_the_size_limit_are_refused(client, server, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1 << 20 and MAX_PIXELS > 700 * 900  # only the file size is over
    with pytest.raises(
        ValueError, match=r"exceeds the maximum file size of 1048576 bytes"
    ):  # the client reads the limit
        _segment(client, big)
    # a client that ignores the limit: the server refuses the upload itself
    boundary = "segdeploy-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + big.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    upload = urllib.request.Request(
        f"{server}gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload, timeout=30)
    assert refused.value.code == 413
    assert _segment(client, _good_image(tmp_path))[4]["image_size"] == [44, 60]


def test_other_modes_are_converted_and_photos_shown_upright(client, tmp_path):
    for kind, path in convertible_inputs(tmp_path).items():
        overlay, *_, details, _ = _segment(client, path)
        expected = [64, 48] if kind == "exif-rotated" else [48, 64]
        assert details["image_size"] == expected, kind
        assert Image.open(overlay["image"]).size == (expected[1], expected[0]), kind


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]  # fmt: skip


def test_a_browser_uploads_an_image_and_sees_the_overlay(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium when it runs as root)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.goto(server, wait_until="networkidle")
            assert "the fastest gated engine here" in page.locator("#header").inner_text()  # the default, said
            page.locator("input[type=file]").first.set_input_files(str(_good_image(tmp_path)))
            page.get_by_role("button", name="Segment").click()
            page.wait_for_selector("#overlay img", timeout=60_000)
            assert page.locator("#overlay img").count() >= 2  # the image and at least one class mask
            assert "inference" in page.locator("#latency").inner_text()
            shown = page.locator("#overlay img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert shown == [60, 44]  # the overlay the browser shows is the uploaded image's, at its size
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)  # for a person to look at
        finally:
            browser.close()


def test_a_long_running_app_keeps_a_bounded_number_of_class_map_files(engines, tmp_path):
    from serve.app import KEEP_CLASS_FILES, Demo

    demo = Demo(engines)
    path = str(_good_image(tmp_path))
    written = [demo.segment(path, "cnn", "ort.cpu.fp32", 0.5)[2] for _ in range(KEEP_CLASS_FILES + 6)]
    kept = sorted(str(p) for p in demo.outputs.glob("classes-*.png"))
    assert kept == written[-KEEP_CLASS_FILES:]  # the newest, each still readable
    assert np.asarray(Image.open(kept[-1])).shape == (44, 60)
    outputs = demo.outputs
    del demo
    gc.collect()
    assert not outputs.exists()  # the app's temp dir goes with it


def test_the_replaced_gradio_function_is_the_one_this_gradio_has():
    """serve.app replaces gradio.processing_utils.save_pil_to_cache (a race on identical outputs); an
    upgrade that changes the private function must show up here, not as truncated images in production."""
    from gradio import processing_utils

    from serve import app

    assert app.GRADIO_PATCHED and processing_utils.save_pil_to_cache is app._save_pil_to_cache
    img = Image.fromarray(np.full((4, 5, 3), 9, np.uint8))
    with TemporaryDirectory() as cache:
        first = processing_utils.save_pil_to_cache(img, cache, format="png")
        again = processing_utils.save_pil_to_cache(img, cache, format="png")  # same content: same file, untouched
        assert first == again and np.asarray(Image.open(first)).tolist() == np.asarray(img).tolist()


def test_the_sliding_window_switch_segments_a_large_image_at_full_detail(client, engines, tmp_path):
    from serve.slide import slide, sliding

    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((engines / "examples").glob("*.png"))[:4]]
    large = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:4], 1)], 0)  # 2x the profile's side
    path = tmp_path / "large.png"
    Image.fromarray(large).save(path)
    _, _, class_file, _, details, latency = client.predict(
        handle_file(str(path)), "cnn", "ort.cpu.fp32", 0.5, True, api_name="/segment"
    )
    segmenter = load_segmenter(engines, "cnn", "ort.cpu.fp32", scores=True)
    expected = slide(segmenter, large, sliding(segmenter))
    assert details["windows"] == expected.windows > 1 and f"{expected.windows} windows" in latency
    np.testing.assert_array_equal(np.asarray(Image.open(class_file)), expected.labels)
