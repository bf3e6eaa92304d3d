import json
import math
import statistics

import pytest

from benchmarks.ablation import TARGETS, differences, group_tables, helps, main, request
from tests.conftest import REPO, tiny_run_args
from train.run_dir import CHECKPOINT_FILE


def rows_of(text: str, section: str) -> dict[str, list[str]]:
    """The rows of the first table after `section`, by arm."""
    lines = text.split(section, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in rows}


def test_protocol_pairs_seeds_reports_test_numbers_and_term_diagnostics(synthetic_root, tmp_path, capsys):
    out = tmp_path / "ablation"
    args = ["--out", str(out), "--seeds", "0", "1", "--jobs", "2", "--arms", "independent"]
    args += ["--arm", "gentle", "method.terms=[pixel_bsd] method.pixel_weight=0.5"]
    args += [*tiny_run_args(synthetic_root, iterations=4), "method.warmup=0"]
    assert main(args) == 0

    metrics = {
        (arm, seed): json.loads((out / arm / f"seed{seed}" / "metrics.json").read_text())
        for arm in ("independent", "gentle")
        for seed in (0, 1)
    }
    # Each arm reached its run; within a seed every arm started from the same students.
    assert "terms:\n  - pixel_bsd" in (out / "gentle" / "seed1" / "config.yaml").read_text()
    assert "pixel_weight: 0.5" in (out / "gentle" / "seed0" / "config.yaml").read_text()
    assert "seed: 1" in (out / "independent" / "seed1" / "config.yaml").read_text()

    text = (out / "table.md").read_text()
    test_best = lambda arm, seed, m: 100 * metrics[arm, seed]["test"]["best"][m]["miou"]  # noqa: E731
    means = rows_of(text, "## test, best weights")
    want = (test_best("gentle", 0, "vit") + test_best("gentle", 1, "vit")) / 2
    assert means["gentle"][1].startswith(f"{want:.2f} ±")
    deltas = rows_of(text, "Paired Δ to `independent`")
    assert set(deltas) == {"gentle"}
    diffs = [test_best("gentle", s, "cnn") - test_best("independent", s, "cnn") for s in (0, 1)]
    assert deltas["gentle"][0].startswith(f"{sum(diffs) / 2:+.2f} ±")
    assert f"(min {min(diffs):+.2f})" in deltas["gentle"][0]
    half = 12.706 * statistics.stdev(diffs) / math.sqrt(2)  # t(0.975, 1 degree of freedom)
    assert f"[{sum(diffs) / 2 - half:+.2f}, {sum(diffs) / 2 + half:+.2f}]" in deltas["gentle"][0]
    per_class = rows_of(text, "## Per-class IoU Δ to `independent`")
    assert len(per_class["gentle cnn"]) == 5  # the synthetic set's classes
    assert "## test, last weights" in text and "| gentle | 1 |" in text

    terms = rows_of(text, "## Distillation terms")
    assert set(terms) == {"gentle"} and terms["gentle"][0] == "pixel_bsd"
    assert all(c != "-" for c in terms["gentle"][2:6])  # ratios for both students and both directions
    assert (out / "curves.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["independent"]["0"]["curve"]["ensemble"]) >= 2  # evaluated at 3 and 4

    # A second call re-tabulates without training again.
    stamp = lambda arm: (out / arm / "seed1" / CHECKPOINT_FILE).stat().st_mtime_ns  # noqa: E731
    before = {arm: stamp(arm) for arm in ("independent", "gentle")}
    assert main(args) == 0
    assert {arm: stamp(arm) for arm in before} == before

    # Report only: more baselines and groups of classes, nothing trained; a run of another config is left out
    # of the report (and left where it is).
    groups = ["--group", "plain", "solid", "stripes", "--group", "rest", "speckle"]
    assert main([*args, "--report-only", "--baselines", "independent", "gentle", *groups]) == 0
    assert {arm: stamp(arm) for arm in before} == before
    text = (out / "table.md").read_text()
    assert set(rows_of(text, "Paired Δ to `gentle`")) == {"independent"}
    assert "- plain: solid, stripes" in text and "| gentle ensemble |" in text
    changed = [a.replace("pixel_weight=0.5", "pixel_weight=0.7") for a in args]
    assert main([*changed, "--report-only"]) == 0
    text = (out / "table.md").read_text()
    assert "gentle/seed0 (trained for another config: method.pixel_weight: 0.5 -> 0.7)" in text  # the "Left out" line
    assert "gentle" not in rows_of(text, "## test, best weights")
    assert not list(out.glob("gentle/*.stale-*")) and stamp("gentle") == before["gentle"]
    # A seed not finished is left out and said; the report stays on the seeds every arm has.
    assert main([*args, "--report-only", "--seeds", "0", "1", "2"]) == 0
    text = (out / "table.md").read_text()
    assert "2 paired seeds" in text and "independent/seed2 (not finished)" in text
    # Nothing finished on the seeds asked for: no report, and not an older one either.
    assert main([*args, "--report-only", "--seeds", "7"]) == 0
    assert "no report written" in capsys.readouterr().out and not (out / "table.md").exists()

    # An arm asked for with another config is trained again, and says so; the old run is kept aside.
    assert main(changed) == 0
    said = capsys.readouterr().out
    assert "[gentle/seed1] asked for another config than it was trained with (method.pixel_weight: 0.5 -> 0.7)" in said
    assert stamp("gentle") != before["gentle"] and stamp("independent") == before["independent"]
    assert "pixel_weight: 0.7" in (out / "gentle" / "seed1" / "config.yaml").read_text()
    assert "pixel_weight: 0.5" in (out / "gentle" / "seed1.stale-1" / "config.yaml").read_text()


def test_group_table_gives_each_groups_mean_iou_and_paired_delta():
    names = ["background", "a", "b", "c"]

    def run(cnn: list[float | None]) -> dict:
        return {"test_best_iou": {"cnn": cnn, "vit": [0.5] * 4, "ensemble": [0.5] * 4}}

    results = {
        "independent": {0: run([0.9, 0.2, 0.4, 0.5]), 1: run([0.9, 0.4, 0.6, 0.5])},
        "full": {0: run([0.9, 0.3, 0.7, 0.5]), 1: run([0.9, 0.5, None, 0.5])},  # b absent from seed 1: 0
    }
    lines = group_tables(results, "independent", names, {"ab": ["a", "b"], "c": ["c"]})
    rows = rows_of("\n".join(lines), "## Groups")
    assert rows["independent cnn"][:2] == ["40.00 ± 14.14", "50.00 ± 0.00"] and rows["independent cnn"][2] == "-"
    # full on ab: seed 0 50 (Δ +20), seed 1 25 (Δ -25): mean -2.5, worst -25
    assert rows["full cnn"][2].startswith("-2.50 ± 31.82") and rows["full cnn"][2].endswith("(min -25.00)")
    assert rows["full vit"][3].startswith("+0.00 ± 0.00")
    with pytest.raises(SystemExit, match=r"unknown classes \['d'\]: the dataset has background, a, b, c"):
        group_tables(results, "independent", names, {"d": ["d"]})


def test_targets_over_the_first_baseline_and_the_others():
    def gains(*per_seed: float) -> dict[str, list[float]]:
        return {m: list(per_seed) for m in ("cnn", "vit", "ensemble")}

    assert helps(gains(1.5, 0.6), TARGETS["first"]) and not helps(gains(3.0, -0.6), TARGETS["first"])
    assert helps(gains(1.5, -0.4), TARGETS["other"]) and not helps(gains(0.6, 0.3), TARGETS["other"])


def test_a_run_is_keyed_by_what_it_trains(synthetic_root, tmp_path):
    """pvt_v2's stride is fixed: a run recorded with any ViT output stride is the same run. A field the record
    lacks (an option added since) is taken at its default."""
    wanted = request(REPO / "configs/synthetic.yaml", [f"data.root={synthetic_root}"])
    recorded = json.loads(json.dumps(wanted))
    recorded["config"]["vit.output_stride"] = 8
    del recorded["config"]["method.learners"]
    (tmp_path / "request.json").write_text(json.dumps(recorded))
    assert differences(tmp_path, wanted) == []
    one_way = request(REPO / "configs/synthetic.yaml", [f"data.root={synthetic_root}", "method.learners=vit"])
    assert differences(tmp_path, one_way) == ["method.learners: 'both' -> 'vit'"]
    stride = wanted["config"]["cnn.output_stride"]
    recorded["config"]["cnn.output_stride"] = 24 - stride  # the CNN's does (8 <-> 16)
    (tmp_path / "request.json").write_text(json.dumps(recorded))
    assert differences(tmp_path, wanted) == [f"cnn.output_stride: {24 - stride} -> {stride}"]


def test_arm_whose_option_cannot_apply_fails_before_training(tmp_path, synthetic_root):
    args = ["--out", str(tmp_path / "a"), *tiny_run_args(synthetic_root), "--arms", "independent"]
    with pytest.raises(SystemExit, match=r"arm 'control': method.selection=random: .* trains none \(dml\)"):
        main([*args, "--arm", "control", "method.preset=dml method.selection=random"])
    assert not (tmp_path / "a").exists()


def test_unknown_arm_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown arm 'nonsense'"):
        main(["--out", str(tmp_path), "--arms", "nonsense"])
    with pytest.raises(SystemExit, match="overrides go before --arms"):  # argparse took it for an arm
        main(["--out", str(tmp_path), "--arms", "dml", "iterations=10"])
    for asked in (["--baselines", "independent"], ["--baselines", "dml", "iterations=10"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path), "--arms", "dml", *asked])
        assert "is not an arm (dml) (config overrides go before" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--arms", "dml", "--group", "shapes"])
    assert "--group shapes: a new name, then the group's classes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_few_labels_baselines_run_as_arms_offline_after_the_run_it_distils_from(synthetic_root, tmp_path):
    """`{out}` and `{seed}` name the supervised run of the same seed; two runs at a time, the offline arm still
    starts only when that run has finished. The `same` arm's report says what its other column holds."""
    out = tmp_path / "few"
    args = ["--out", str(out), "--seeds", "0", "--jobs", "2", *tiny_run_args(synthetic_root, iterations=4)]
    args += ["data.labeled=6", "method.start=0", "method.warmup=0", "method.pseudo_threshold=0"]
    args += ["--arm", "supervised", "method.preset=independent"]
    args += ["--arm", "offline", "method.preset=offline method.offline_run={out}/supervised/seed{seed}"]
    args += ["--arm", "same_cnn", "method.preset=cross method.pair=cnn"]
    assert main(args) == 0
    assert f"offline_run: {out}/supervised/seed0" in (out / "offline" / "seed0" / "config.yaml").read_text()
    supervised_done = (out / "supervised" / "seed0" / "metrics.json").stat().st_mtime
    offline_began = (out / "offline" / "seed0" / "request.json").stat().st_mtime  # claimed before training
    assert offline_began <= supervised_done <= (out / "offline" / "seed0" / "tensorboard").stat().st_mtime
    text = (out / "table.md").read_text()
    assert "`same_cnn` trains two CNNs (method.pair=cnn): its other column is the second CNN" in text
    terms = rows_of(text, "## Distillation terms")
    assert terms["offline"][0] == "offline" and float(terms["offline"][4]) > 0  # unlabelled pixels taught
