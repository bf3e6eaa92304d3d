from __future__ import annotations

import torch

from train.checkpoint import load_state, save_state


def test_nested_state_round_trips_with_int_keys(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optim": opt.state_dict(), "it": 5, "best": {"cnn": {"miou": 0.5}}, "rng": torch.get_rng_state()}
    save_state(state, tmp_path / "ck" / "last.safetensors")
    loaded = load_state(tmp_path / "ck" / "last.safetensors")
    assert loaded["it"] == 5 and loaded["best"] == {"cnn": {"miou": 0.5}}
    assert torch.equal(loaded["rng"], state["rng"])
    assert set(loaded["optim"]["state"]) == {0, 1}  # int parameter ids survive JSON
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optim"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list((tmp_path / "ck").glob(".*tmp"))  # the temp file was renamed into place
