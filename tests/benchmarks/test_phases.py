from benchmarks.phases import main


def test_every_phase_is_timed_and_printed_and_a_failing_one_stops_the_rest(capsys, tmp_path):
    marker = tmp_path / "third"
    assert main(["first=true", "second=sleep 0.2", f"third=touch {marker}"]) == 0
    out = capsys.readouterr().out
    for phase in ("first", "second", "third", "total"):
        assert f"| {phase} |" in out
    assert marker.is_file() and "| second | 0 |" in out
    marker.unlink()
    assert main(["ok=true", "broken=exit 3", f"never=touch {marker}"]) == 3
    out = capsys.readouterr().out
    assert "stopped: a phase failed" in out and "| broken |" in out and "| never |" not in out
    assert not marker.exists()
