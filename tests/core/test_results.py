import os

import pandas as pd

from diffmem.core.results import atomic_write_text, read_parquet, revision_key, write_parquet


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
    from doubles import free_for_another_run, held_by_another_run

    from diffmem.core.errors import InputError
    from diffmem.core.results import hold_folder, let_go_folder

    pytest.importorskip("fcntl")
    folder = tmp_path / "out"
    with held_by_another_run(folder):
        with pytest.raises(InputError, match="is in use by another diffmem run; wait for it to end, or choose another"):
            hold_folder(folder)
    key = hold_folder(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []  # no lock file among the user's files
    assert not free_for_another_run(folder)
    let_go_folder(key)  # the run ended
    assert free_for_another_run(folder)


def test_holds_of_one_process_nest_and_the_last_let_go_ends_the_hold(tmp_path):
    # the command line holds a run's folder, and the Python API under it holds it again: not a second run
    import pytest
    from doubles import free_for_another_run

    pytest.importorskip("fcntl")
    from diffmem.core.results import folder_held, hold_folder, let_go_folder

    folder = tmp_path / "out"
    outer = hold_folder(folder)
    (tmp_path / "link").symlink_to(folder)
    with folder_held(tmp_path / "link"):  # the same folder, otherwise named
        (folder / "kept.txt").write_text("work")
    assert not free_for_another_run(folder)  # the outer hold still stands
    let_go_folder(outer)
    assert free_for_another_run(folder) and (folder / "kept.txt").is_file()
    # a folder the hold made goes when it is let go still empty: a failed run leaves no new folder
    with folder_held(tmp_path / "failed"):
        pass
    assert not (tmp_path / "failed").exists()


def test_another_thread_of_the_same_process_is_another_run_and_is_refused(tmp_path):
    # the system's lock is the process's, so two runs started from one notebook's threads would
    # otherwise both take it, and write the same parts at once
    import threading

    from diffmem.core.errors import InputError
    from diffmem.core.results import _HOLDS, folder_held, hold_folder, let_go_folder

    folder = tmp_path / "out"
    outcome = {}

    def second_run():
        try:
            with folder_held(folder):
                outcome["held"] = True
        except InputError as e:
            outcome["refused"] = str(e)

    key = hold_folder(folder)
    thread = threading.Thread(target=second_run)
    thread.start()
    thread.join()
    assert "held" not in outcome
    assert "in use by another diffmem run in this process (another thread)" in outcome["refused"]
    with folder_held(folder):  # the holding thread still nests its own holds
        pass
    let_go_folder(key)
    thread = threading.Thread(target=second_run)  # and once it lets go, the other thread may run there
    thread.start()
    thread.join()
    assert outcome.get("held") is True
    assert key not in _HOLDS  # nothing stays held


def test_a_file_system_without_locks_runs_unguarded_rather_than_failing(tmp_path, monkeypatch):
    import errno

    import pytest

    fcntl = pytest.importorskip("fcntl")
    from diffmem.core.results import hold_folder, let_go_folder

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    key = hold_folder(tmp_path / "out")
    assert (tmp_path / "out").is_dir()
    hold_folder(tmp_path / "out")  # nor is a second hold refused
    let_go_folder(key)
    let_go_folder(key)


def _swap_killed_at(monkeypatch, moving, folder, write):
    """replace_folder(folder, write), killed as it renames the folder named ``moving``."""
    import pytest
    from doubles import killed_renaming

    from diffmem.core.results import replace_folder

    with killed_renaming(monkeypatch, moving), pytest.raises(KeyboardInterrupt):
        replace_folder(folder, write)


def test_a_folder_swap_a_kill_stopped_after_writing_is_finished_and_one_stopped_before_is_not(tmp_path, monkeypatch):
    import pytest

    from diffmem.core.results import finish_replace, replace_folder

    def version(n):
        def write(tmp):
            tmp.mkdir()
            (tmp / "done").write_text(str(n))
        return write

    def state(folder):
        return sorted(p.name for p in folder.parent.iterdir()), (folder / "done").read_text()

    # killed at each rename of the swap, replacing version 1 with version 2: what the next reader finds
    for moving, found in (("model.tmp", "1"), ("model", "2"), ("model.new", "2")):
        folder = tmp_path / moving / "model"
        folder.parent.mkdir()
        replace_folder(folder, version(1))
        _swap_killed_at(monkeypatch, moving, folder, version(2))
        assert state(finish_replace(folder, "done")) == (["model"] + (["model.tmp"] if moving == "model.tmp" else []), found)
    # a first save, killed between its renames: no folder yet, the new one whole beside it
    folder = tmp_path / "first" / "model"
    folder.parent.mkdir()
    _swap_killed_at(monkeypatch, "model.new", folder, version(1))
    assert state(finish_replace(folder, "done")) == (["model"], "1")
    # killed while writing: the previous folder stays, the half-written one is not taken
    folder = tmp_path / "writing" / "model"
    folder.parent.mkdir()
    replace_folder(folder, version(1))

    def half(tmp):
        tmp.mkdir()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_folder(folder, half)
    assert finish_replace(folder, "done") == folder and (folder / "done").read_text() == "1"
    # a user's own folder named like the swap's is never taken for one: it has no marker
    mine = tmp_path / "mine" / "model"
    mine.mkdir(parents=True)
    (mine.parent / "model.new").mkdir()
    (mine.parent / "model.new" / "notes.txt").write_text("mine")
    finish_replace(mine, "done")
    assert sorted(p.name for p in mine.parent.iterdir()) == ["model", "model.new"]


def test_a_revision_enters_keys_from_2_on_so_work_saved_before_revisions_keeps_its_key():
    class First:
        revision = 1

    class Later:
        revision = 3

    assert revision_key(First) == {} and revision_key(object()) == {}
    assert revision_key(Later) == {"revision": 3} and revision_key(Later(), "extractor_revision") == {"extractor_revision": 3}
