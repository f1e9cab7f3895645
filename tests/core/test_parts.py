import json

import pytest

from diffmem.core.parts import in_parts


def _run(folder, chunks, computed, stale="refuse"):
    def compute(chunk):
        computed.append(chunk)
        return [c.upper() for c in chunk]

    def save(part, result):
        (part / "result.json").write_text(json.dumps(result))

    def load(part):
        return json.loads((part / "result.json").read_text())

    return list(in_parts(chunks, [f"key-{c[0]}" for c in chunks], folder, compute, save, load, stale=stale))


@pytest.mark.parametrize("stale", ["refuse", "restart"])
def test_a_marked_part_whose_files_cannot_be_read_is_redone(tmp_path, stale):
    chunks = [["a", "b"], ["c"], ["d"]]
    first = []
    assert _run(tmp_path, chunks, first, stale) == [["A", "B"], ["C"], ["D"]] and first == chunks
    (tmp_path / "part_0001" / "result.json").write_text("{not json")
    (tmp_path / "part_0002" / "result.json").unlink()
    again = []
    with pytest.warns(UserWarning, match="redoing .*part_000[12]: its saved files cannot be read") as caught:
        assert _run(tmp_path, chunks, again, stale) == [["A", "B"], ["C"], ["D"]]
    assert again == [["c"], ["d"]]  # the readable part is kept
    assert sorted(str(w.message).split(":")[0].rsplit("/", 1)[1] for w in caught) == ["part_0001", "part_0002"]
    third = []
    assert _run(tmp_path, chunks, third, stale) == [["A", "B"], ["C"], ["D"]] and third == []  # mended for good


def test_removing_a_jobs_parts_keeps_what_else_the_folder_holds(tmp_path):
    from diffmem.core.parts import remove_parts

    folder = tmp_path / "parts"
    for name in ("part_0000", "part_0001", "control_0000", "group_0012"):
        (folder / name).mkdir(parents=True)
        (folder / name / "done.json").write_text("{}")
    (folder / "drawings").mkdir()
    (folder / "drawings" / "a.svg").write_text("<svg/>")
    (folder / "notes_2024.txt").write_text("mine")
    remove_parts(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["drawings", "notes_2024.txt"]
    for p in ("drawings/a.svg", "notes_2024.txt"):
        (folder / p).unlink()
    (folder / "drawings").rmdir()
    (folder / "part_0000").mkdir()
    remove_parts(folder)
    assert not folder.exists()  # only parts in it: the folder goes too
    remove_parts(folder)  # and a folder that is not there is nothing to do


def test_parts_are_held_from_the_call_until_the_work_ends_or_is_dropped(tmp_path):
    # the API held nothing: two processes writing one parts folder (two notebooks, a job queued twice)
    # computed and wrote the same parts at once
    from doubles import free_for_another_run, held_by_another_run

    from diffmem.core.errors import InputError

    folder = tmp_path / "parts"
    chunks = [["a"], ["b"]]
    with held_by_another_run(folder):
        computed = []
        with pytest.raises(InputError, match="is in use by another diffmem run"):
            _run(folder, chunks, computed)
        assert computed == [] and list(folder.iterdir()) == []
    assert _run(folder, chunks, []) == [["A"], ["B"]] and free_for_another_run(folder)  # let go once done

    started = in_parts(chunks, ["k0", "k1"], tmp_path / "other", lambda c: c, lambda part, r: None, lambda part: None)
    assert not free_for_another_run(tmp_path / "other")  # held before the first part is asked for
    assert next(started) == ["a"]
    del started  # dropped unfinished: a notebook cell interrupted, say
    assert free_for_another_run(tmp_path / "other")
    never_started = in_parts(chunks, ["k0", "k1"], tmp_path / "third", lambda c: c, lambda part, r: None, lambda part: None)
    del never_started
    assert not (tmp_path / "third").exists()  # made by the hold, and empty: gone with it
