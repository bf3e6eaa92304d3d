"""The GPU verification script, as far as a CPU machine can run it: its plan and its Python half."""

from __future__ import annotations

import json
import os
import re
import subprocess

from benchmarks.gpu_check import main as gpu_check
from tests.conftest import REPO


def plan(tmp_path, seconds: int | None = None, phases=()) -> list[str]:
    env = {**os.environ, "GPU_SH_DRY": "1"} | ({"GPU_SH_SECONDS": str(seconds)} if seconds else {})
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", str(tmp_path), *phases], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_plan_measures_in_order_of_value_what_a_gpu_host_without_tensorrt_can_within_its_deadline(tmp_path):
    steps = plan(tmp_path, seconds=900)
    names = [m[1] for line in steps if (m := re.match(r"step (\S+) \d+s:", line))]
    assert names == [
        "ort-options", "bench-compiled", "bf16-bisect", "export-1024x2048", "bench-ort-cuda", "bench-eager", "gpu-check"
    ]  # fmt: skip
    limits = [int(m[1]) for line in steps if (m := re.match(r"step \S+ (\d+)s:", line))]
    assert sum(limits) <= 900
    text = "\n".join(steps)
    assert "benchmarks.gpu_check" in text and "--size 1024 2048" in text
    for backend in ("torch.fp16", "torch.bf16", "torch.compile", "torch.cudagraphs", "ort.cuda.fp32", "ort.cuda.fp16"):
        line = next(s for s in steps if backend in s)
        batches = "--batch-sizes 1 " if backend in ("torch.compile", "torch.cudagraphs") else "--batch-sizes 1 8"
        assert "--sizes 1024x2048" in line and batches in line, backend
    options = next(s for s in steps if "benchmarks.ort_cuda" in s)  # every option set against eager, at the size
    assert "--size 1024 2048" in options
    assert "benchmarks.bf16_bisect" in text and "--iterations 500" in text
    short = plan(tmp_path, seconds=480)  # the default deadline: the least valuable phase is what gives way
    assert short[-1].startswith("== gpu-check: skipped, out of time")


def test_steps_past_the_deadline_are_skipped_and_said(tmp_path):
    steps = plan(tmp_path, seconds=200)
    assert any(s.startswith("== bench-eager: skipped, out of time") for s in steps)
    assert steps[-1].startswith("== gpu-check: skipped")


def test_the_ablation_phase_runs_the_paired_protocol_at_256_on_its_own_set(tmp_path):
    steps = plan(tmp_path, seconds=540, phases=["ablation"])
    assert [s.split()[1] for s in steps] == ["data-256", "ablation-256"]
    assert "--height 256 --width 256" in steps[0] and "--out data/synthetic-256" in steps[0]
    assert "--config configs/synthetic-256.yaml" in steps[1] and "--arms independent dml full --seeds 0 1 2" in steps[1]
    assert sum(int(re.match(r"step \S+ (\d+)s:", s)[1]) for s in steps) <= 540


def test_the_complementary_phase_runs_the_reporting_seeds_then_the_second_round(tmp_path):
    steps = plan(tmp_path, seconds=480, phases=["complementary"])
    assert [s.split()[1] for s in steps] == ["complementary-reporting", "complementary-round2"]
    reporting, round2 = steps
    assert "--seeds 10 11 12 13 14" in reporting and "--purpose reporting" in reporting
    assert "--baselines independent dml_b random_a" in reporting and "--group cue cue_warm cue_cool" in reporting
    assert "--seeds 0 1" in round2 and "--purpose tuning" in round2 and "--out runs/complementary " in round2
    arms = dict(re.findall(r"--arm (\w+) (.*?)(?= --arm| --baselines)", round2))
    assert sorted(arms) == sorted(f"{family}_{c}" for family in ("full", "dml", "random") for c in "def")
    # the candidates the results file pre-registers, each with its overrides; the controls are the method's
    registered = (REPO / "benchmarks/results/ablation-complementary.md").read_text().split("## 6.")[1]
    table = dict(re.findall(r"\| `(\w+)` \| `([^`]+)` \|", registered))
    assert {a: o for a, o in arms.items() if not a.startswith("random_")} == table
    assert all(arms[f"random_{c}"] == f"{arms[f'full_{c}']} method.selection=random" for c in "def")
    assert sum(int(re.match(r"step \S+ (\d+)s:", s)[1]) for s in steps) <= 480


def test_unknown_phase_exits_2(tmp_path):
    args = ["bash", "benchmarks/gpu.sh", str(tmp_path), "warp"]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown phase 'warp'" in done.stderr


def test_gpu_check_runs_on_the_cpu_with_the_cuda_rows_marked(trained_run, tmp_path, capsys):
    assert gpu_check(["--run", str(trained_run), "--out", str(tmp_path), "--size", "48", "80", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert result["env"]["gpu"] is None and result["size"] == [48, 80] and result["images"] == 4
    for student in ("cnn", "vit"):
        row = result["agreement"][student]
        assert row["tf32"] is None and row["fp16"] is None  # CUDA-only modes
        assert 0.5 <= row["bf16"] <= 1.0
        assert result["peak_memory"][student] == {"fp32": None, "fp16": None}
    assert result["profile_max"] == [16, 96, 160]  # what `export --size 48 80` chooses
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| cnn | n/a | n/a |" in report and report in capsys.readouterr().out


def test_the_bf16_bisection_writes_each_runs_row_as_it_ends(synthetic_root, tmp_path, monkeypatch):
    """Its Python half on the CPU: every variant and seed trained at once, a row each in rows.jsonl, a table."""
    from benchmarks.bf16_bisect import main as bisect
    from tests.conftest import tiny_run_args

    # its two runs train at once: the cores split between them (as ablation --jobs does), not each taking all
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    args = ["--out", str(tmp_path), "--config", "configs/synthetic.yaml", "--seeds", "0", "--iterations", "3"]
    args += [*tiny_run_args(synthetic_root, 3), "device=cpu", "--variants", "bf16", "bf16-no-fused-attention"]
    assert bisect(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["bf16", "bf16-no-fused-attention"]
    assert all(r["exit"] == 0 and not r["diverged"] and r["val_miou_cnn_vit"] for r in rows)
    assert "| bf16-no-fused-attention | 0 | False |" in (tmp_path / "bisect.md").read_text()


def test_the_ort_cuda_options_script_writes_each_row_as_it_measures_it(trained_run, tmp_path):
    """Its CPU dry run: eager PyTorch, then each graph on ONNX Runtime with the default options, one JSON line
    each; the export's fp16 graph carries fewer Cast nodes than the one with norms kept in fp32."""
    from benchmarks.ort_cuda import main as ort_cuda

    args = ["--run", str(trained_run), "--models", "cnn", "--size", "48", "80", "--seconds", "0.05"]
    assert ort_cuda([*args, "--images", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    meta, *rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert meta["meta"]["serve_cuda_options"] == {"use_tf32": "0"}
    assert [(r["engine"], r["options"]) for r in rows] == [
        ("torch", "eager fp32"), *[(f"ort.cpu.{g}", "default") for g in ("fp32", "fp16", "fp16-fp32-norms")]
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows[1:]) and rows[1]["agreement"] >= 0.999
    assert rows[2]["casts"] <= rows[3]["casts"]
    assert "| cnn | ort.cpu.fp16 | default |" in (tmp_path / "report.md").read_text()


def test_the_few_labels_phase_runs_the_gate_then_the_registered_tuning_round(tmp_path):
    steps = plan(tmp_path, seconds=900, phases=["few-labels"])
    assert [s.split()[1] for s in steps] == ["few-labels-gate", "few-labels-gate-check", "few-labels-tuning"]
    gate, check, tuning = steps
    assert "--arms independent --arm supervised_100 data.labeled=100" in gate and "--seeds 0 1 2" in gate
    assert "--full-runs runs/few-labels-gate/independent/seed0" in check
    assert "--cnn-classes cue_warm cue_cool --vit-classes disc triangle square" in check
    assert "--purpose tuning" in tuning and "data.labeled=100" in tuning and "--baselines supervised" in tuning
    arms = dict(re.findall(r"--arm (\w+) (.*?)(?= --arm| --baselines)", tuning))
    registered = (REPO / "benchmarks/results/ablation-few-labels.md").read_text().split("## Tuning")[1]
    table = dict(re.findall(r"\| `(\w+)` \| `([^`]+)` \|", registered.replace(" balanced", " BALANCED")))
    balanced = "method.pseudo_balance=class method.views=weak_strong"
    single = {a: o.replace(balanced, "BALANCED") for a, o in arms.items() if not a.startswith(("same_", "random_"))}
    assert single == table
    for c in "ab":  # the same-architecture pairs and the controls are the method's candidates
        full = arms[f"full_{c}"].split()
        assert arms[f"random_{c}"].split() == [full[0], "method.selection=random", *full[1:]]
        for pair in ("cnn", "vit"):
            assert arms[f"same_{pair}_{c}"].split() == [full[0], f"method.pair={pair}", *full[1:]]
