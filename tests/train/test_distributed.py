"""DistributedDataParallel on CPU: two gloo ranks launched by torchrun."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_module, tiny_run_args
from train.evaluate import evaluate_run
from train.run_dir import CHECKPOINT_FILE, METRICS_FILE, load_run_config


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_ranks_stay_identical_and_evaluate_the_whole_split(synthetic_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny_run_args(synthetic_root), "device=cpu"]  # global batch 4: two images per rank
    result = run_module(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "train" / "ddp_worker.py"),
        str(run_dir),
        str(tmp_path),
        *args,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # Each rank saw other images, yet all-reduced gradients (and rank 0's BatchNorm statistics)
    # keep both students identical on both ranks.
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.startswith("vit.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    # Rank 0 alone wrote a complete run dir.
    assert (run_dir / CHECKPOINT_FILE).is_file() and (run_dir / "cnn.safetensors").is_file()
    assert load_run_config(run_dir).data.batch_size == 4

    # Each rank evaluated half of the split; the summed confusion matrices give the metrics of the
    # whole split, the same as one process evaluating every image.
    reduced = json.loads((run_dir / METRICS_FILE).read_text())
    single = evaluate_run(run_dir, device="cpu")
    for model in ("cnn", "vit", "ensemble"):
        assert reduced[model]["miou"] == pytest.approx(single[model]["miou"], abs=1e-9)
        assert reduced[model]["acc"] == pytest.approx(single[model]["acc"], abs=1e-9)
