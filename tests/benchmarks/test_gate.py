from benchmarks.gate import verdict


def seed(cnn_lead=6.0, vit_lead=9.0, oracle_gain=7.5, shared_errors=0.3, one_right=0.08):
    return dict(
        cnn_lead=cnn_lead, vit_lead=vit_lead, oracle_gain=oracle_gain, shared_errors=shared_errors, one_right=one_right
    )


def test_gate_passes_only_when_every_check_holds_on_every_seed():
    passed, lines = verdict({"seed0": seed(), "seed1": seed()})
    assert passed and all(line.endswith("pass |") for line in lines[2:])
    # one seed below one rule fails the gate, and the table says which rule
    for bad in (
        dict(cnn_lead=3.9),
        dict(vit_lead=-1.0),
        dict(oracle_gain=4.9),
        dict(shared_errors=0.41),
        dict(one_right=0.049),
    ):
        passed, lines = verdict({"seed0": seed(), "seed1": seed(**bad)})
        failing = [line.split("|")[1].strip() for line in lines[2:] if "**fail**" in line]
        assert not passed and failing == list(bad), bad
    # the boundaries themselves pass
    assert verdict({"seed0": seed(cnn_lead=4.0, oracle_gain=5.0, shared_errors=0.40, one_right=0.05)})[0]
