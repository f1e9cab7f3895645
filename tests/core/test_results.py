import os

import pandas as pd

from diffmem.core.results import atomic_write_text, read_parquet, write_parquet


def test_atomic_writes_use_the_umask_and_leave_no_temp_files(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        write_parquet(pd.DataFrame({"x": [1, 2]}), tmp_path / "b.parquet", {"k": 1})
    finally:
        os.umask(old)
    for name in ("a.json", "b.parquet"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.parquet"]
    frame, meta = read_parquet(tmp_path / "b.parquet")
    assert list(frame["x"]) == [1, 2] and meta == {"k": 1}


def test_a_held_folder_is_refused_to_a_second_run_until_the_first_lets_go(tmp_path):
    import pytest

    from diffmem.core.errors import InputError
    from diffmem.core.results import hold_folder

    pytest.importorskip("fcntl")
    folder = tmp_path / "out"
    first = hold_folder(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []  # no lock file among the user's files
    with pytest.raises(InputError, match="is in use by another diffmem run"):
        hold_folder(folder)
    os.close(first)  # the run ended
    os.close(hold_folder(folder))


def test_a_file_system_without_locks_runs_unguarded_rather_than_failing(tmp_path, monkeypatch):
    import errno

    import pytest

    fcntl = pytest.importorskip("fcntl")
    from diffmem.core.results import hold_folder

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert hold_folder(tmp_path / "out") is None and (tmp_path / "out").is_dir()
