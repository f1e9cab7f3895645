"""Result types: every stage's result carries its settings and seeds, and saves and loads.

Writes are atomic (a temporary file renamed into place), so an interrupted save never leaves a
half-written results file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _umask_mode() -> int:
    # mkstemp creates 0600 files; results should get the permissions any other file would
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path, replace: bool = True):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on
    any error it is removed. Readers never see a half-written file.

    ``replace=False``: ``path`` is not replaced if it exists by then, written meanwhile by another
    run say (FileExistsError, the temporary file removed): a check before the work would leave
    that run's file to be replaced by whichever finishes last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _publish_new(tmp: str, path: Path) -> None:
    """Rename ``tmp`` to ``path`` only if ``path`` does not exist: a hard link is made only to a new
    name, in one step, where a check and a rename leave a moment between them."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists") from None
    except OSError:  # a file system without hard links: checked, then renamed
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


# the folders beside ``folder`` a ``replace_folder`` goes through: written, whole, and the one replaced
SWAP_SUFFIXES = (".tmp", ".new", ".old")


def swap_names(folder: Path) -> tuple[Path, Path, Path]:
    """``folder``'s written, whole and replaced names (``.tmp``, ``.new``, ``.old`` beside it)."""
    return tuple(folder.with_name(folder.name + suffix) for suffix in SWAP_SUFFIXES)


def replace_folder(folder: str | Path, write) -> Path:
    """The folder counterpart of ``atomic_path``: ``write(tmp)`` fills ``folder.tmp`` beside it; once
    it returns, that is renamed ``folder.new`` (so a ``.new`` folder is always whole) and swapped in:
    ``folder`` to ``folder.old``, ``folder.new`` to ``folder``, the old one removed. A kill while writing
    leaves the previous folder in place; a kill after it, the new one whole, which ``finish_replace``
    (called by whoever reads ``folder`` next) moves in."""
    import shutil

    folder = Path(folder)
    tmp, new, old = swap_names(folder)
    for leftover in (tmp, new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    write(tmp)
    tmp.rename(new)
    _swap_in(folder, new, old)
    return folder


def _swap_in(folder: Path, new: Path, old: Path) -> None:
    import shutil

    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def finish_replace(folder: str | Path, marker: str) -> Path:
    """Finish a ``replace_folder`` a kill stopped after its writing: the whole new folder it left in
    ``folder.new`` is swapped in (the previous one, in ``folder`` or ``folder.old``, goes). Only if
    ``folder.new`` holds ``marker``, a file its writer leaves, so a user's own ``.new`` folder is
    never taken for one."""
    import shutil

    folder = Path(folder)
    _, new, old = swap_names(folder)
    if (new / marker).is_file():
        shutil.rmtree(old, ignore_errors=True)  # the previous one, if the kill fell between the two renames
        _swap_in(folder, new, old)
    return folder


def foreign_folder(folder: str | Path, marker: str) -> bool:
    """Whether ``folder`` holds files but not ``marker``, the file a diffmem writer leaves there first:
    work there would overwrite or misread files diffmem did not write (new and empty folders are fine)."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file()


# this process's holds, by resolved folder: [descriptor or None, holds, made by the first hold, holding thread]
_HOLDS: dict[Path, list] = {}
_HOLDS_LOCK = threading.RLock()  # re-entered if the collector lets go of a dropped run's hold meanwhile


def hold_folder(folder: str | Path, instead: str = "choose another output folder") -> Path:
    """Hold ``folder`` (created if new) for one run: a second run into the same folder, such as a
    command started twice, a re-queued job or two notebooks, would write the same parts and
    checkpoints at once. An advisory lock on the folder itself, so no lock file is left among the
    user's files; the system frees it when the process ends, however it ends. Not guarded where
    there is no ``flock`` (Windows, some network mounts). ``instead``: what the refusal tells the
    user to do besides waiting.

    Holds nest within one thread: the command line holds its folder before the model loads, and the
    Python API under it holds the same folder again where it writes. Another thread of the same
    process (two runs started from one notebook) is another run, and is refused: the system's lock
    cannot tell threads apart. Returns the key that ``let_go_folder`` takes; the last let-go of a
    folder ends the hold."""
    from .errors import InputError

    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _HOLDS_LOCK:
        if key in _HOLDS:
            if _HOLDS[key][3] != threading.get_ident():
                raise InputError(f"{folder} is in use by another diffmem run in this process (another thread); "
                                 f"wait for it to end, or {instead}")
            _HOLDS[key][1] += 1
            return key
        try:
            fd = _lock(folder)
        except BlockingIOError:
            raise InputError(f"{folder} is in use by another diffmem run; wait for it to end, or {instead}") from None
        _HOLDS[key] = [fd, 1, created, threading.get_ident()]
    return key


def _lock(folder: Path) -> int | None:
    """An exclusive lock on ``folder``'s own descriptor, or None where it cannot be had but the run may
    go on unguarded; BlockingIOError when another run holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that can be written but not read: it cannot be held, and the run goes on
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # a file system without locks (some network mounts): not guarded, as on Windows
        os.close(fd)
        return None
    return fd


def let_go_folder(key: Path) -> None:
    """Undo one ``hold_folder``. The last one ends the hold and removes the folder if its first hold
    made it and it is still empty (the model failed to load, say): a failed run leaves no new folder."""
    with _HOLDS_LOCK:
        entry = _HOLDS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HOLDS[key]
    fd, _, created, _ = entry
    if fd is not None:
        os.close(fd)
    if created:
        try:
            key.rmdir()  # only an empty folder goes
        except OSError:
            pass


@contextmanager
def folder_held(folder: str | Path, instead: str = "choose another output folder"):
    """``hold_folder`` for the ``with`` block."""
    key = hold_folder(folder, instead)
    try:
        yield Path(folder)
    finally:
        let_go_folder(key)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(o):
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return to_jsonable(o.tolist())
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o


def digest(obj) -> str:
    """A short stable hash of JSON-able settings: what resumable work is keyed by."""
    import hashlib

    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def revision_key(method, name: str = "revision") -> dict:
    """What a key of saved work holds of ``method``'s revision (a class attribute bumped when the
    method gives other outputs for the same settings): ``{name: n}`` from revision 2 on, and nothing
    at revision 1 or without one, so work saved before the method had a revision keeps its key."""
    revision = getattr(method, "revision", 1)
    return {} if revision == 1 else {name: revision}


def file_digest(path: str | Path) -> str:
    """A short hash of a file's bytes, read a megabyte at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dump_json(obj, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1, allow_nan=True))


def write_parquet(frame, path: str | Path, metadata: dict | None = None) -> None:
    """Write a pandas frame to Parquet atomically, with ``metadata`` (JSON) in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata is not None:
        meta = dict(table.schema.metadata or {})
        meta[b"diffmem"] = json.dumps(to_jsonable(metadata)).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path):
    """Read a Parquet file written by ``write_parquet``: (frame, metadata dict)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"diffmem")
    return table.to_pandas(), (json.loads(raw) if raw else {})


@contextmanager
def reading_saved(path: str | Path, what: str):
    """Around a result's ``load``: a missing, foreign or damaged file becomes one clear InputError
    naming the path and what was expected, not a KeyError or a JSON parser's message."""
    from .errors import InputError, kind_and_first_line

    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"no saved {what} at {path}: {e.filename or path} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{path} is a file; a saved {what} is a folder") from None
    except KeyError as e:
        raise InputError(f"{path} is not a saved {what}: it has no {e.args[0]!r}") from None
    except (OSError, ValueError, TypeError, AttributeError, IndexError) as e:  # JSON, Parquet, npz, shapes
        raise InputError(f"{path} is not a saved {what} ({kind_and_first_line(e)})") from None
