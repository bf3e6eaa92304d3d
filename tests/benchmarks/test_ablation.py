import json

from benchmarks.ablation import main
from tests.conftest import tiny_run_args
from train.run_dir import CHECKPOINT_FILE


def test_ablation_trains_each_preset_once_and_tabulates(synthetic_root, tmp_path):
    out = tmp_path / "ablation"
    args = ["--out", str(out), *tiny_run_args(synthetic_root, iterations=2), "--presets", "independent", "dml"]
    assert main(args) == 0

    rows = {line.split("|")[1].strip(): line for line in (out / "table.md").read_text().splitlines() if "|" in line}
    for preset in ("independent", "dml"):
        metrics = json.loads((out / preset / "metrics.json").read_text())
        cells = [c.strip() for c in rows[preset].split("|")[2:5]]
        assert cells == [f"{100 * metrics[m]['miou']:.2f}" for m in ("cnn", "vit", "ensemble")]
        # The preset flag reached the run (it overrides the shared overrides' preset).
        assert f"preset: {preset}" in (out / preset / "config.yaml").read_text()
    assert "2 iterations" in (out / "table.md").read_text()

    # A second call re-tabulates without training again.
    stamp = (out / "dml" / CHECKPOINT_FILE).stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "dml" / CHECKPOINT_FILE).stat().st_mtime_ns == stamp
