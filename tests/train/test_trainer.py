"""The trainer through its real CLI: a complete run dir, exact resume after SIGKILL, clear errors (the refusals
before training starts through the CLI's main() in this process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks.ablation import scalars
from tests.conftest import REPO, tiny_run_args, train_here
from train.checkpoint import load_state, load_weights
from train.config import ConfigError, OptimizerConfig, load_config
from train.data.synthetic import CLASS_NAMES
from train.trainer import ResumableSampler, Trainer, amp_dtype, cpu_has_bf16, lr_factor


def test_sampler_resumes_mid_stream_and_crosses_epochs():
    full = list(islice(iter(ResumableSampler(10, 4, seed=3)), 40))  # 5 iterations of 2 per epoch... 10 its
    resumed = list(islice(iter(ResumableSampler(10, 4, seed=3, start_iter=3)), 40 - 12))
    assert resumed == full[12:]
    epoch0 = [i for i, _ in full[:8]]
    assert len(set(epoch0)) == 8  # no repeats inside an epoch (last 2 of 10 dropped)
    assert [i for i, _ in full[8:16]] != epoch0  # reshuffled every epoch
    assert len({seed for _, seed in full}) == len(full)  # one augmentation seed per sample


def test_sampler_shards_global_batches_across_ranks():
    single = list(islice(iter(ResumableSampler(12, 4, seed=0)), 24))
    ranks = [list(islice(iter(ResumableSampler(12, 2, seed=0, rank=r, world=2)), 12)) for r in (0, 1)]
    for batch in range(6):
        merged = ranks[0][2 * batch : 2 * batch + 2] + ranks[1][2 * batch : 2 * batch + 2]
        assert merged == single[4 * batch : 4 * batch + 4]


def test_amp_on_cpu_is_bf16_only_where_native():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("bf16", cpu) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert amp_dtype("fp16", cpu) is None and amp_dtype("none", cpu) is None
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("bf16", cuda) == torch.bfloat16
    assert amp_dtype("none", cuda) is None


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = OptimizerConfig(warmup_iters=10, poly_power=1.0)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(0.91)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(99, 100, cfg) == pytest.approx(0.01)
    assert lr_factor(0, 100, OptimizerConfig(poly_power=0.9)) == 1.0


def test_grad_clip_bounds_one_students_step(synthetic_root, tmp_path):
    # Plain SGD (no momentum, no decay, no warm-up): the step is lr x the clipped gradient.
    sgd = ["optimizer.momentum=0", "optimizer.weight_decay=0", "optimizer.poly_power=0"]
    overrides = [*tiny_run_args(synthetic_root), "data.verify=false", "amp=none", "method.preset=independent"]
    overrides += [f"{s}.{o}" for s in ("cnn",) for o in sgd] + ["cnn.optimizer.grad_clip=1e-3"]
    trainer = Trainer(load_config(REPO / "configs/synthetic.yaml", overrides), tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.students.named_parameters()}
    logs = trainer.step(trainer.batch(next(iter(trainer.train_loader())), None))

    assert logs["grad_norm_cnn"] > 1e-3 and "grad_norm_vit" not in logs  # clipped; the ViT is not
    after = {k: v.detach() for k, v in trainer.students.named_parameters()}
    step = {
        s: torch.cat([(after[k] - v).flatten() for k, v in before.items() if k.startswith(s)]) for s in ("cnn", "vit")
    }
    assert step["cnn"].norm() == pytest.approx(0.01 * 1e-3, rel=0.01)  # lr x clip (fp32 weight differences)
    assert step["vit"].norm() > 1e-3  # AdamW, unclipped: a full-size step


def test_region_bsd_needs_decoder_features_of_one_width_or_adapters(synthetic_root, tmp_path):
    widths = [*tiny_run_args(synthetic_root), "data.verify=false", "cnn.decoder_channels=32", "vit.decoder_channels=48"]
    plain = [*widths, "method.preset=full", "method.region_adapter=false"]
    with pytest.raises(ConfigError, match=r"cnn.decoder_channels \(32\) must equal .* method.region_adapter=true"):
        Trainer(load_config(REPO / "configs/synthetic.yaml", plain), tmp_path / "a")
    trainer = Trainer(load_config(REPO / "configs/synthetic.yaml", [*widths, "method.preset=hfd"]), tmp_path / "b")
    batch = trainer.batch(next(iter(trainer.train_loader())), None)
    assert torch.isfinite(trainer.step(batch)["hfd"])  # only region-wise BSD compares decoder features

    adapted = [*widths, "method.preset=full", "method.region_adapter=true", "method.start=0", "method.warmup=0"]
    trainer = Trainer(load_config(REPO / "configs/synthetic.yaml", adapted), tmp_path / "c")
    adapter = trainer.objective.cnn_adapter[0].weight
    in_cnn_optimizer = any(p is adapter for g in trainer.optimizers["cnn"].param_groups for p in g["params"])
    assert adapter.shape == (48, 32, 1, 1) and in_cnn_optimizer  # the learner's optimizer trains its adapter
    before = adapter.detach().clone()
    logs = trainer.step(batch, diagnose=True)
    assert torch.isfinite(logs["region_bsd"]) and not torch.equal(adapter, before)
    assert {"ratio_region_bsd_cnn", "ratio_hfd_vit", "ratio_pixel_bsd_cnn"} <= set(logs)


def train_cli(run_dir: Path, data_root: Path, *extra: str, iterations: int = 6) -> subprocess.CompletedProcess:
    args = ["--config", "configs/synthetic.yaml", "--run-dir", str(run_dir), *tiny_run_args(data_root, iterations)]
    return train_here(*args, *extra)


def train_main(capsys, run_dir: Path, data_root: Path, *extra: str) -> tuple[int, str]:
    """`python -m train` on a new run in this process: its exit status and stderr. For refusals that come before
    training starts, which need no interpreter of their own (a new one spends seconds on its imports)."""
    from train.__main__ import main

    argv = ["--config", str(REPO / "configs/synthetic.yaml"), "--run-dir", str(run_dir)]
    try:
        code = main([*argv, *tiny_run_args(data_root), *extra])
    except SystemExit as e:  # argparse's parser.error
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(trained_run) -> Path:
    """The session's tiny run, trained by the CLI's main (tests/conftest.py): 8 iterations, evaluated at 3, 6, 8."""
    return trained_run


def test_training_writes_a_complete_run_dir(finished_run):
    files = {p.relative_to(finished_run).as_posix() for p in finished_run.rglob("*") if p.is_file()}
    assert {"config.yaml", "cnn.safetensors", "vit.safetensors", "metrics.json", "checkpoint/last.safetensors"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".tmp")) for f in files)

    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["iteration"] == 8
    for model in ("cnn", "vit", "ensemble"):
        assert 0.0 <= metrics[model]["miou"] <= 1.0 and len(metrics[model]["iou"]) == len(CLASS_NAMES)
        assert 0.0 <= metrics[model]["acc"] <= 1.0
    # The held-out split: best weights (picked on val) and last weights, each model on all of its images.
    assert metrics["test"]["split"] == "test"
    for which in ("best", "last"):
        assert all(0.0 <= metrics["test"][which][m]["miou"] <= 1.0 for m in ("cnn", "vit", "ensemble"))

    config = (finished_run / "config.yaml").read_text()
    assert f"num_classes: {len(CLASS_NAMES)}" in config and "- checker" in config  # resolved from the dataset

    state, info = load_weights(finished_run / "cnn.safetensors")
    assert info["student"] == "cnn" and info["iteration"] in (3, 6, 8)
    assert metrics["cnn"]["iteration"] == info["iteration"]
    assert any(k.startswith("encoder.") for k in state)
    assert not any(k.startswith(("cnn_to_vit", "vit_to_cnn")) for k in state)  # projectors are training-only
    checkpoint = load_state(finished_run / "checkpoint" / "last.safetensors")
    assert set(checkpoint["objective"]) >= {"cnn_to_vit.1.0.weight", "vit_to_cnn.1.0.weight", "cnn_adapter.0.weight"}


def test_the_default_method_trains_end_to_end_and_logs_each_term(finished_run):
    """The tiny run trains `full` with the default options: CE alone for the first quarter, then every
    term, with its gradient ratio to CE and the direction shares in TensorBoard."""
    tb = {tag: dict(points) for tag, points in scalars(finished_run).items()}
    assert tb["train/hfd"][1] == 0 and tb["train/hfd"][6] > 0  # progress 0 is before method.start
    assert tb["train/ratio_hfd_cnn"][6] > 0 and tb["train/ratio_region_bsd_vit"][6] >= 0
    assert {"train/region_vit_to_cnn", "train/pixel_cnn_to_vit", "train/ratio_pixel_bsd_cnn"} <= set(tb)


def test_evaluate_cli_reproduces_the_run_metrics(finished_run, tmp_path, capsys):
    from train.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--run", str(finished_run), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| cnn |" in table and "| ensemble |" in table
    again, saved = json.loads(out.read_text()), json.loads((finished_run / "metrics.json").read_text())
    for model in ("cnn", "vit", "ensemble"):
        assert again[model]["miou"] == pytest.approx(saved[model]["miou"], abs=1e-9)
    # The reported held-out numbers are the best weights' on the test split.
    args = ("--run", str(finished_run), "--split", "test", "--json", str(out))
    assert main(list(args)) == 0
    test = json.loads(out.read_text())
    for model in ("cnn", "vit", "ensemble"):
        assert test[model]["miou"] == pytest.approx(saved["test"]["best"][model]["miou"], abs=1e-9)


def test_existing_run_is_not_overwritten(finished_run, synthetic_root, capsys):
    before = (finished_run / "cnn.safetensors").read_bytes()
    code, err = train_main(capsys, finished_run, synthetic_root)
    assert code != 0 and "--resume" in err
    assert (finished_run / "cnn.safetensors").read_bytes() == before


def _checkpoint_iteration(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["state"])["iteration"]
    except Exception:
        return -1


def test_resume_after_sigkill_reaches_the_same_weights(synthetic_root, tmp_path):
    """One-way `full` (the ViT learns, the CNN only teaches): the same weights after a SIGKILL and a resume, and
    the CNN's learner-side projectors as they were built, through both."""
    iterations, one_way = 6, ["method.learners=vit", "method.start=0", "checkpoint_interval=2"]
    straight = tmp_path / "straight"
    assert train_cli(straight, synthetic_root, *one_way, iterations=iterations).returncode == 0

    killed = tmp_path / "killed"
    args = ["--config", "configs/synthetic.yaml", "--run-dir", str(killed), *tiny_run_args(synthetic_root, iterations)]
    args += one_way
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while _checkpoint_iteration(killed / "checkpoint" / "last.safetensors") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    stopped_at = _checkpoint_iteration(killed / "checkpoint" / "last.safetensors")
    assert 2 <= stopped_at < iterations

    result = train_here("--resume", str(killed))
    assert result.returncode == 0, result.stderr
    assert f"resumed {killed} at iteration {stopped_at}" in result.stderr

    a = load_state(straight / "checkpoint" / "last.safetensors")
    b = load_state(killed / "checkpoint" / "last.safetensors")
    assert a["iteration"] == b["iteration"] == iterations
    for student in ("cnn", "vit"):
        for key, value in a["students"][student].items():
            torch.testing.assert_close(b["students"][student][key], value, rtol=1e-4, atol=1e-5, msg=key)
    config = load_config(killed / "config.yaml", ["data.verify=false"])
    built = Trainer(config, tmp_path / "built").objective.state_dict()  # the same seed: the projectors as built
    for key, value in b["objective"].items():
        if key.endswith(("weight", "bias")):  # the CNN's learner side is frozen, the ViT's trains
            assert torch.equal(value, built[key]) == key.startswith(("cnn_to_vit", "cnn_adapter")), key
    assert json.loads((killed / "metrics.json").read_text())["cnn"]["miou"] == pytest.approx(
        json.loads((straight / "metrics.json").read_text())["cnn"]["miou"], abs=1e-3
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.root=/no/such/dataset"], "dataset root not found: /no/such/dataset"),
        (["data.batch_size=lots"], "data.batch_size: expected int"),
        (["data.batch_size=64"], "fewer than one batch of 64"),
        (["method.start=1.5"], "method.start=1.5: distillation must start before the end of training"),
        (["method.pixel_margin=-0.5"], "method.pixel_margin=-0.5: must be >= 0"),
    ],
)
def test_bad_input_exits_with_a_clear_message(synthetic_root, tmp_path, capsys, args, message):
    code, err = train_main(capsys, tmp_path / "run", synthetic_root, *args)
    assert code == 2 and message in err
    assert "Traceback" not in err


def test_a_diverged_run_stops_with_its_last_checkpoint_intact_and_resumes_with_a_fix(synthetic_root, tmp_path):
    run = tmp_path / "run"
    assert train_cli(run, synthetic_root, "method.preset=independent", iterations=2).returncode == 0
    saved = load_state(run / "checkpoint" / "last.safetensors")

    blown = train_here("--resume", str(run), "iterations=6", "cnn.optimizer.lr=1e30")
    assert blown.returncode == 3 and "Traceback" not in blown.stderr
    # NaN at iteration 4, when a checkpoint is due: the check comes first
    assert "training diverged at iteration 4: ce_cnn is nan. The checkpoint of iteration 2 is intact" in blown.stderr
    kept = load_state(run / "checkpoint" / "last.safetensors")  # not overwritten by NaN weights
    assert kept["iteration"] == 2
    logged = scalars(run)  # what the stopped run logged before it stopped is on disk
    assert logged["val/cnn/miou"][-1][0] == 3 and logged["train/loss"][-1][0] == 3
    for name, weight in saved["students"]["cnn"].items():
        assert torch.equal(kept["students"]["cnn"][name], weight), name

    assert train_here("--resume", str(run), "cnn.optimizer.lr=0.01").returncode == 0  # the fix
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 6


def test_resume_without_checkpoint_is_explained(tmp_path, capsys):
    from train.__main__ import main

    assert main(["--resume", str(tmp_path)]) == 2 and "not a run dir" in capsys.readouterr().err


def test_every_method_arm_of_a_seed_shares_the_students_and_the_random_stream(synthetic_root, tmp_path):
    """Paired comparisons: the projectors and adapters of a method do not shift the global RNG, so the
    students' initial weights and every later random draw (dropout) are those of `independent`."""
    base = [*tiny_run_args(synthetic_root), "data.verify=false", "seed=3"]
    arms = {"independent": ["method.preset=independent"], "full": ["method.preset=full", "method.region_adapter=true"]}
    states, streams = {}, {}
    for name, extra in arms.items():
        trainer = Trainer(load_config(REPO / "configs/synthetic.yaml", [*base, *extra]), tmp_path / name)
        states[name] = trainer.students.state_dict()
        streams[name] = torch.get_rng_state()
    assert len(trainer.objective.learner_modules("cnn")) == 2  # full built its projectors and an adapter
    assert torch.equal(streams["independent"], streams["full"])
    for key, value in states["independent"].items():
        assert torch.equal(value, states["full"][key]), key
