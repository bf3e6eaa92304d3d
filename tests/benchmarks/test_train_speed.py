import json

import pytest

from benchmarks.train_speed import main
from train.trainer import cpu_has_bf16


def test_train_speed_times_both_presets_and_writes_json(synthetic_root, tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = ["--crop", "32", "48", "--batch", "2", "--warmup", "1", "--steps", "2", "--rounds", "2", "--device", "cpu"]
    assert main([*args, "--json", str(out), f"data.root={synthetic_root}"]) == 0

    r = json.loads(out.read_text())
    assert r["crop"] == [32, 48] and r["batch"] == 2 and r["amp"] == ("bf16" if cpu_has_bf16() else "none")
    assert "CPU" in r["device"] or "threads" in r["device"]
    for preset in ("independent", "full"):
        assert r[preset]["steps"] == 2
        assert r[preset]["images_per_s"] == pytest.approx(2000 / r[preset]["step_ms"]["median"])
    ratio = r["full"]["step_ms"]["median"] / r["independent"]["step_ms"]["median"]
    assert r["overhead"] == pytest.approx(ratio - 1)
    table = capsys.readouterr().out
    assert "| independent |" in table and "| full |" in table and "overhead" in table


def test_profile_names_the_costliest_ops_of_each_preset(synthetic_root, capsys):
    args = ["--crop", "32", "48", "--batch", "2", "--warmup", "1", "--steps", "1", "--rounds", "1", "--device", "cpu"]
    assert main([*args, "--profile", "5", f"data.root={synthetic_root}"]) == 0
    out = capsys.readouterr().out
    for preset in ("independent", "full"):
        section = out.split(f"## {preset}: one step, profiled", 1)[1]
        assert "aten::convolution_backward" in section.split("## ", 1)[0]  # the students' own cost is there
