"""Test doubles shared by the resume and run-guard tests (importable: pytest's ``pythonpath`` holds tests/)."""

import os
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def killed_renaming(monkeypatch, moving: str, nth: int = 1):
    """Within the block, the ``nth`` rename of a path named ``moving`` raises KeyboardInterrupt, as a
    kill at that point of a folder swap would; other renames go through. Renames work again after it."""
    rename, moves = Path.rename, []

    def killed(self, target):
        if self.name == moving:
            moves.append(target)
            if len(moves) == nth:
                raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed)
    try:
        yield
    finally:
        monkeypatch.setattr(Path, "rename", rename)


@contextmanager
def held_by_another_run(folder):
    """Within the block, ``folder`` is held as a first diffmem run still going would hold it (skips
    the test where there is no ``flock``); let go after it."""
    fcntl = pytest.importorskip("fcntl")
    # a lock of its own, not through diffmem's holds: those of one process nest, another run's do not
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield
    finally:
        os.close(fd)


def free_for_another_run(folder) -> bool:
    """Whether another process could hold ``folder`` now: a lock of its own on it (another open of
    the folder, as another process's would be), taken and given back at once."""
    fcntl = pytest.importorskip("fcntl")
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def bump_revision(monkeypatch, method_class) -> None:
    """Make ``method_class`` the next revision of itself, as a later diffmem whose method gives other
    outputs for the same settings would be (undone with the test; a class without one counts as 1)."""
    monkeypatch.setattr(method_class, "revision", getattr(method_class, "revision", 1) + 1, raising=False)


class Recording:
    """Stands in for an explainer, a mitigation method or a detector: its ``call`` method (attribute,
    mitigate, score) passes through to the real one and records its first argument (a prompt or a
    list of prompts), and raises KeyboardInterrupt, as a killed run would, when that argument is or
    holds ``fail_on``. Everything else (pipe, method, settings, seeds) is the real one's."""

    def __init__(self, inner, call: str, fail_on=None):
        self.inner, self.fail_on, self.calls = inner, fail_on, []
        real = getattr(inner, call)

        def recorded(arg, *args, **kw):
            if arg == fail_on or (isinstance(arg, list) and fail_on in arg):
                raise KeyboardInterrupt
            self.calls.append(arg)
            return real(arg, *args, **kw)

        setattr(self, call, recorded)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def count_live_decoded_images(monkeypatch) -> tuple[list, list]:
    """Record the images the scan's sources decode: (weak references to each, and before each decode
    how many decoded earlier are still held). A reader that keeps each image only until it is reduced
    has 0 held before every decode; one that holds a shard of them, up to the shard's size."""
    import weakref

    import diffmem.scan.sources as sources

    decoded, live_before = [], []
    real = sources.load_image

    def recording(value):
        live_before.append(sum(ref() is not None for ref in decoded))
        image = real(value)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(sources, "load_image", recording)
    return decoded, live_before


def hub_cache_with(tmp_path, monkeypatch, repo_id, folder):
    """A hub cache, laid out as huggingface_hub writes one, holding ``folder`` as ``repo_id``'s main, offline."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / commit
