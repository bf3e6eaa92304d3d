from benchmarks.phases import main, table


def test_every_phase_is_timed_and_printed_and_a_failing_one_stops_the_rest(capsys, tmp_path):
    marker = tmp_path / "third"
    assert main(["first=true", "second=true", f"third=touch {marker}"]) == 0
    out = capsys.readouterr().out
    names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert names == ["phase", "first", "second", "third", "total"] and marker.is_file()
    marker.unlink()
    assert main(["ok=true", "broken=exit 3", f"never=touch {marker}"]) == 3
    out = capsys.readouterr().out
    assert "stopped: a phase failed" in out and "| broken |" in out and "| never |" not in out
    assert not marker.exists()


def test_the_table_gives_each_phases_seconds_and_share_even_when_all_took_no_time():
    assert table([("data", 30.0), ("train", 90.0)]).splitlines()[2:] == [
        "| data | 30 | 25 % |", "| train | 90 | 75 % |", "| total | 120 | |"
    ]  # fmt: skip
    assert table([("instant", 0.0)]).splitlines()[2:] == ["| instant | 0 | - |", "| total | 0 | |"]
