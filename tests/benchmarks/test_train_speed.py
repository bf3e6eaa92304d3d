import json

import pytest

from benchmarks.train_speed import main
from train.trainer import cpu_has_bf16


def test_train_speed_times_both_presets_writes_json_and_profiles_the_costliest_ops(synthetic_root, tmp_path, capsys):
    """One run for the timing and the profile: each preset's trainer (its losses compiled) is built once."""
    out = tmp_path / "speed.json"
    args = ["--crop", "32", "48", "--batch", "2", "--warmup", "1", "--steps", "2", "--rounds", "2", "--device", "cpu"]
    assert main([*args, "--json", str(out), "--profile", "5", f"data.root={synthetic_root}"]) == 0

    r = json.loads(out.read_text())
    assert r["crop"] == [32, 48] and r["batch"] == 2 and r["amp"] == ("bf16" if cpu_has_bf16() else "none")
    assert "CPU" in r["device"] or "threads" in r["device"]
    for preset in ("independent", "full"):
        assert r[preset]["steps"] == 2
        assert r[preset]["images_per_s"] == pytest.approx(2000 / r[preset]["step_ms"]["median"])
    ratio = r["full"]["step_ms"]["median"] / r["independent"]["step_ms"]["median"]
    assert r["overhead"] == pytest.approx(ratio - 1)
    out = capsys.readouterr().out
    assert "| independent |" in out and "| full |" in out and "overhead" in out
    for preset in ("independent", "full"):  # the profile names the costliest ops of each preset
        section = out.split(f"## {preset}: one step, profiled", 1)[1]
        assert "aten::convolution_backward" in section.split("## ", 1)[0]  # the students' own cost is there
