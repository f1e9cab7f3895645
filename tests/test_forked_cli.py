"""The suite's forked command line (tests/forked_cli.py) answers as a plain ``python -m diffmem.cli`` does."""

import subprocess

import forked_cli


def test_forked_command_matches_a_plain_process(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    monkeypatch.chdir(tmp_path)  # relative paths resolve in the caller's working directory
    for args in (["--help"], ["detect", "--prompts", "empty.txt", "--out", "r.parquet"], ["detect", "--bogus"]):
        forked = forked_cli.run_cli(*args)
        plain = subprocess.run([*forked_cli.PLAIN, *args], capture_output=True, text=True, timeout=120)
        assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr), args
    assert "holds no prompts" in forked_cli.run_cli("detect", "--prompts", "empty.txt").stderr


def test_a_command_past_its_timeout_is_killed(tmp_path):
    import pytest

    with pytest.raises(subprocess.TimeoutExpired):
        forked_cli.run_cli("memlab", "verify", "--out", tmp_path / "v", timeout=1)
    assert forked_cli.run_cli("--help").returncode == 0  # and the next command still runs
