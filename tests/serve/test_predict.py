"""`python -m serve.predict` over real files: folders, globs, videos, bad files, reruns."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from serve.backends import usable
from serve.images import read_image
from serve.predict import CONFIDENCE, main, recorded
from serve.segmenter import choices, fastest, load_segmenter
from tests.conftest import REPO
from tests.serve.conftest import bad_inputs, convertible_inputs

MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def photos(engines, tmp_path_factory):
    """The export's example images in a nested folder tree."""
    root = tmp_path_factory.mktemp("photos")
    examples = sorted((engines / "examples").glob("*.png"))
    assert len(examples) >= 3
    for i, src in enumerate(examples[:3]):
        folder = root if i == 0 else root / "sub" / ("deeper" if i == 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").save(folder / f"photo{i}.jpg" if i == 1 else folder / f"photo{i}.png")
    return root


def lines(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_folder_gives_class_maps_equal_to_the_segmenter(engines, photos, tmp_path, capsys):
    out = tmp_path / "out"
    fp32 = ["--variant", "fp32", "--backend", "onnxruntime"]
    assert main(["--engines", str(engines), "--out", str(out), "--model", "vit", *fp32, "--overlay", str(photos)]) == 0
    segmenter = load_segmenter(engines, "vit")
    sources = sorted(p for p in photos.rglob("*") if p.is_file())
    for source in sources:
        rel = source.relative_to(photos).with_suffix(".png")
        with Image.open(out / rel) as class_map:
            assert class_map.mode == "P"  # pixel values are class ids, the palette the dataset's colours
            assert class_map.getpalette()[:6] == [c for rgb in segmenter.palette[:2].tolist() for c in rgb]
            labels = np.asarray(class_map)
        image = read_image(source)
        assert labels.shape == image.shape[:2]
        assert np.array_equal(labels, segmenter.predict(image).labels)
        assert (out / "overlay" / rel.with_suffix(".jpg")).is_file()
    records = lines(out)
    assert sorted(r["output"] for r in records) == sorted(
        str(p.relative_to(photos).with_suffix(".png")) for p in sources
    )
    for r in records:
        assert abs(sum(r["shares"].values()) - 1) < 1e-3 and set(r["shares"]) <= set(segmenter.classes)
        assert r["timings_ms"]["inference"] > 0 and r["height"] > 0
    assert f"3 of 3 inputs segmented into {out}" in capsys.readouterr().out


def test_rerun_skips_what_is_done_and_force_redoes_it(engines, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--engines", str(engines), "--out", str(out), str(photos)]
    assert main(args) == 0
    first = out / "photo0.png"
    os.utime(first, (0, 0))
    capsys.readouterr()
    assert main(args) == 0
    assert first.stat().st_mtime == 0 and "3 of 3 inputs already done" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert first.stat().st_mtime > 0
    assert len(lines(out)) == 3  # one line per output after a forced rerun


def test_a_rerun_with_another_model_engine_or_options_redoes_what_another_recipe_made(
    engines, photos, tmp_path, capsys
):
    """Done means: on disk, and recorded as made the way this run would make it (never the file name alone)."""
    out = tmp_path / "out"
    args = ["--engines", str(engines), "--out", str(out), "--backend", "ort.cpu.fp32", str(photos)]
    assert main(args) == 0
    assert {r["made_by"]["model"] for r in lines(out)} == {"cnn"}
    capsys.readouterr()
    for other in (["--model", "vit"], ["--model", "vit", "--backend", "ort.cpu.fp16"], ["--model", "vit", "--slide"]):
        assert main([*args, *other]) == 0
        err = capsys.readouterr().err
        assert "already done" not in err and "3 inputs made otherwise before" in err, other
    assert {r["made_by"]["slide"] is not None for r in lines(out)} == {True}
    assert main([*args, "--model", "vit", "--slide"]) == 0 and "3 of 3 inputs already done" in capsys.readouterr().err
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"output": "photo0.png", "made_by"')  # a line a kill cut short is no record
    assert main([*args, "--model", "vit", "--slide"]) == 0 and "3 of 3 inputs already done" in capsys.readouterr().err


def test_a_killed_run_started_again_keeps_what_it_finished_and_ends_as_an_uninterrupted_one(engines, tmp_path):
    folder = tmp_path / "in"
    for i in range(6):  # large images, by sliding windows: seconds each
        _mosaic(engines, folder / f"{i}", tiles=(3, 4))
    args = ["-m", "serve.predict", "--engines", str(engines), "--model", "vit", "--backend", "ort.cpu.fp32", "--slide"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, *args, "--out", str(straight), str(folder)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    command = [sys.executable, *args, "--out", str(killed), str(folder)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while not (results.is_file() and results.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "it ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = recorded(results)
    assert 2 <= len(finished) < 6 and not list(killed.rglob(".*.tmp"))  # a half-written file is never left as done
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{len(finished)} of 6 inputs already done" in again.stderr
    for mask in straight.rglob("*.png"):
        assert np.array_equal(np.asarray(Image.open(mask)), np.asarray(Image.open(killed / mask.relative_to(straight))))
    assert len(recorded(results)) == 6


def test_glob_and_single_file_inputs(engines, photos, tmp_path):
    out = tmp_path / "out"
    pattern = str(photos / "sub" / "**" / "*.png")
    assert (
        main(["--engines", str(engines), "--out", str(out), "--model", "ensemble", pattern, str(photos / "photo0.png")])
        == 0
    )
    assert (out / "deeper" / "photo2.png").is_file() and (out / "photo0.png").is_file()  # relative to the glob's base
    assert not (out / "photo1.png").exists()


def test_bad_files_are_skipped_by_name_and_the_rest_segmented(engines, photos, tmp_path, capsys):
    folder = tmp_path / "in"
    bad = bad_inputs(folder)
    (folder / "good.png").rename(folder / "fine.png")
    out = tmp_path / "out"
    code = main(["--engines", str(engines), "--out", str(out), "--max-pixels", str(MAX_PIXELS), str(folder),
                 str(tmp_path / "nowhere.png")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    for kind, path in bad.items():
        assert str(path) in err, kind
    assert "nowhere.png: no such file" in err
    assert (out / "fine.png").is_file() and [r["output"] for r in lines(out)] == ["fine.png"]


def make_video(path, frames):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_gives_class_map_frames_and_an_overlay_video(engines, tmp_path):
    av = pytest.importorskip("av")
    examples = sorted((engines / "examples").glob("*.png"))
    frames = [np.asarray(Image.open(p).convert("RGB").resize((64, 48))) for p in examples[:3]] * 2
    video = tmp_path / "clips" / "drive.mp4"
    video.parent.mkdir()
    make_video(video, frames)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    out = tmp_path / "out"
    code = main(["--engines", str(engines), "--out", str(out), "--overlay", str(tmp_path / "clips")])
    assert code == 1  # the broken clip
    maps = sorted((out / "drive").glob("*.png"))
    assert len(maps) == 6 and np.asarray(Image.open(maps[0])).shape == (48, 64)
    with av.open(str(out / "overlay" / "drive.mp4")) as overlay:
        decoded = [f.to_ndarray(format="rgb24") for f in overlay.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (48, 64, 3)
    (record,) = lines(out)
    assert record["frames"] == 6 and record["output"] == "drive"
    assert json.loads((out / "drive" / "summary.json").read_text())["frames"] == 6


def test_a_lone_onnx_file_needs_no_engine_dir(engines, photos, tmp_path, capsys):
    lone = tmp_path / "copied" / "vit-fp16.onnx"
    lone.parent.mkdir()
    lone.write_bytes((engines / "vit" / "model.fp16.onnx").read_bytes())  # no manifest beside it
    alone = load_segmenter(lone)
    assert alone.name == "vit" and alone.labels_io and alone.classes == load_segmenter(engines, "vit").classes
    image = read_image(photos / "photo0.png")
    expected = load_segmenter(engines, "vit", "ort.cpu.fp16").predict(image).labels
    assert np.array_equal(alone.predict(image).labels, expected)
    out = tmp_path / "out"
    assert main(["--engines", str(lone), "--out", str(out), str(photos / "photo0.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "photo0.png")), expected)

    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(lone))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    assert main(["--engines", str(foreign), "--out", str(out), str(photos / "photo0.png")]) == 2
    assert "no 'segdeploy.manifest' metadata" in capsys.readouterr().err


def test_modes_and_orientations_give_upright_class_maps_at_the_input_size(engines, tmp_path):
    folder = tmp_path / "modes"
    inputs = convertible_inputs(folder)  # grayscale, RGBA, 16-bit, palette, EXIF-rotated
    out = tmp_path / "out"
    assert main(["--engines", str(engines), "--out", str(out), str(folder)]) == 0
    classes = len(load_segmenter(engines, "cnn").classes)
    for kind, path in inputs.items():
        labels = np.asarray(Image.open(out / path.relative_to(folder).with_suffix(".png")))
        assert labels.shape == read_image(path).shape[:2] and labels.max() < classes, kind
    assert np.asarray(Image.open(out / "exif-rotated.png")).shape == (64, 48)  # shown upright: 48 wide, 64 high


PREDICT_WITHOUT_TORCH = """
import json, sys
from serve.predict import CONFIDENCE, main, recorded
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                  "train": [m for m in sys.modules if m.split(".")[0] in ("train", "export")]}))
"""


def test_predict_never_imports_torch(engines, photos, tmp_path):
    args = ["--engines", str(engines), "--out", str(tmp_path / "out"), "--model", "ensemble", str(photos)]
    result = subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT_TORCH, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": [], "train": []}


def test_by_default_the_fastest_gated_engine_is_used_and_named(engines, photos, tmp_path, capsys):
    backend, times = fastest(engines, "cnn")
    assert times[backend] == min(times.values()) and "ort.cpu.fp32" in times
    runnable = {b.name for m, b in choices(engines, usable()) if m == "cnn"}
    assert set(times) == runnable  # every backend this CPU runs
    out = tmp_path / "out"
    assert main(["--engines", str(engines), "--out", str(out), str(photos / "photo0.png")]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("engine: "))
    assert "the fastest gated engine here" in line and "ort.cpu.fp32 " in line
    chosen = re.match(r"engine: cnn on (\S+),", line).group(1)
    assert chosen in times
    expected = load_segmenter(engines, "cnn", chosen).predict(read_image(photos / "photo0.png"))
    assert np.array_equal(np.asarray(Image.open(out / "photo0.png")), expected.labels)


def _engine_line(capsys) -> str:
    return next(x for x in capsys.readouterr().err.splitlines() if x.startswith("engine: "))


def test_the_engine_auto_picks_is_the_same_on_every_run_and_so_are_the_masks(engines, photos, tmp_path, capsys):
    picked, masks = [], []
    for run in range(3):
        out = tmp_path / f"out{run}"
        assert main(["--engines", str(engines), "--out", str(out), "--model", "ensemble", str(photos)]) == 0
        line = _engine_line(capsys)
        picked.append(re.match(r"engine: ensemble on (\S+),", line).group(1))
        masks.append([np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))])
        assert "timed at export on this CPU" in line  # the export ran here: its recorded timings decide
    assert len(set(picked)) == 1
    assert all(np.array_equal(a, b) for a, b in zip(masks[0], masks[2], strict=True))


def test_where_the_export_did_not_time_this_cpu_the_first_pick_is_kept_for_the_next_runs(engines, tmp_path, capsys):
    from serve.manifest import read_manifest, write_manifest

    copy = tmp_path / "export"
    shutil.copytree(engines, copy)
    for student in ("cnn", "vit"):  # exported on another machine
        manifest = read_manifest(copy / student)
        manifest.timings = {**manifest.timings, "cpu": "Another CPU"}
        write_manifest(manifest, copy / student)
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    shutil.copy(next((engines / "examples").glob("*.png")), image)
    first = main(["--engines", str(copy), "--out", str(tmp_path / "o1"), "--model", "cnn", str(image)])
    line1 = _engine_line(capsys)
    second = main(["--engines", str(copy), "--out", str(tmp_path / "o2"), "--model", "cnn", str(image)])
    line2 = _engine_line(capsys)
    assert first == second == 0
    assert "timed now, kept in" in line1 and "timed on this host before" in line2
    assert line1.split(";")[0] == line2.split(";")[0]  # the same engine, the same times


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(engines, photos, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    out = folder / "masks"
    args = ["--engines", str(engines), "--out", str(out), "--backend", "ort.cpu.fp32", str(folder)]
    assert main(args) == 0
    assert main([*args, "--force"]) == 0  # a second run: the first run's masks are not new inputs
    assert not (out / "masks").exists()
    assert sorted(r["output"] for r in lines(out)) == sorted(
        str(p.relative_to(photos).with_suffix(".png")) for p in photos.rglob("*") if p.is_file()
    )


def _mosaic(engines, folder, tiles=(2, 3)) -> tuple[np.ndarray, Path]:
    """A large image made of the export's example images, larger than the engines' profile."""
    examples = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((engines / "examples").glob("*.png"))]
    h, w = examples[0].shape[:2]
    rows = [np.concatenate([examples[(r * tiles[1] + c) % len(examples)][:h, :w] for c in range(tiles[1])], 1)
            for r in range(tiles[0])]  # fmt: skip
    mosaic = np.concatenate(rows, 0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mosaic).save(folder / "mosaic.png")
    return mosaic, folder / "mosaic.png"


def test_slide_writes_what_the_sliding_segmenter_computes_with_its_confidence(engines, tmp_path, capsys):
    from serve.slide import slide, sliding

    mosaic, path = _mosaic(engines, tmp_path / "in")
    out = tmp_path / "out"
    args = ["--engines", str(engines), "--out", str(out), "--model", "vit", "--backend", "ort.cpu.fp32", str(path)]
    assert main([*args, "--slide", "--confidence"]) == 0
    assert "sliding windows of" in capsys.readouterr().err
    segmenter = load_segmenter(engines, "vit", "ort.cpu.fp32", scores=True)
    expected = slide(segmenter, mosaic, sliding(segmenter))
    assert np.array_equal(np.asarray(Image.open(out / "mosaic.png")), expected.labels)
    confidence = np.asarray(Image.open(out / "mosaic.confidence.png"))
    assert confidence.dtype == np.uint16 and confidence.shape == mosaic.shape[:2]
    np.testing.assert_allclose(confidence / 65535, expected.confidence, atol=1e-4)
    (record,) = lines(out)
    assert record["windows"] == expected.windows > 1
    assert record["confidence"] == {"file": "mosaic.confidence.png", "holds": CONFIDENCE["png"][1]}
    assert main([*args, "--confidence", "--confidence-format", "npy", "--force"]) == 0  # fitted, as float32
    assert np.load(out / "mosaic.confidence.npy").dtype == np.float32
    plain = tmp_path / "plain"  # the class map beside a confidence map is the one a plain run writes
    assert main([*args[:2], "--out", str(plain), *args[4:]]) == 0
    assert np.array_equal(np.asarray(Image.open(plain / "mosaic.png")), np.asarray(Image.open(out / "mosaic.png")))


def test_slide_says_when_an_image_is_smaller_than_a_window_or_the_engines_smallest_input(engines, tmp_path, capsys):
    segmenter = load_segmenter(engines, "cnn", "ort.cpu.fp32", scores=True)
    (wh, ww), (lh, lw) = segmenter.opt_hw, segmenter.min_hw
    rng = np.random.default_rng(0)
    for name, hw in (("narrow", (wh + 20, lw + 4)), ("tiny", (lh - 8, ww))):
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    inputs = [str(tmp_path / "narrow.png"), str(tmp_path / "tiny.png")]
    assert main(["--engines", str(engines), "--out", str(out), "--backend", "ort.cpu.fp32", "--slide", *inputs]) == 0
    err = capsys.readouterr().err
    assert f"a {wh + 20}x{lw + 4} image is smaller than the {wh}x{ww} window: windows cut to the image" in err
    assert f"a {lh - 8}x{ww} image is under the engines' smallest input: fitted" in err
    windows = {Path(r["file"]).stem: r["windows"] for r in lines(out)}
    assert windows == {"narrow": 2, "tiny": 1}  # the tiny image ran fitted: one call


def test_slide_options_the_engines_cannot_take_fail_in_one_line(engines, tmp_path, capsys):
    _, path = _mosaic(engines, tmp_path / "in")
    base = [
        "--engines",
        str(engines),
        "--out",
        str(tmp_path / "out"),
        "--backend",
        "ort.cpu.fp32",
        str(path),
        "--slide",
    ]
    for extra, message in (
        (["--window", "500", "500"], "window 500x500 is outside the engines' profile"),
        (["--stride", "0", "5"], "stride 0x5 must be at least 1"),
        (["--stride", "100", "100"], "at most the window"),
        (["--stride", "4", "4"], "covers each pixel"),
    ):
        assert main([*base, *extra]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error")]
        assert len(err) == 1 and message in err[0], err
