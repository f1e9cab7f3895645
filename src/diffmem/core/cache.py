"""A content-keyed disk cache for arrays that are slow to compute and never change for a given
input (MemLab's rendered training set and its VAE round-trip errors, say).

Entries are safetensors files named by a hash of everything they depend on, so a stale entry
cannot be read: a changed input is a different name. The cache is best effort: an unreadable or
unwritable cache is recomputed, never an error.

Where: ``$DIFFMEM_CACHE`` if set (``off`` disables the cache), else ``$XDG_CACHE_HOME/diffmem``,
else ``~/.cache/diffmem``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np

from .results import atomic_path

DISABLED = ("", "0", "off", "none", "false")


def cache_dir() -> Path | None:
    env = os.environ.get("DIFFMEM_CACHE")
    if env is not None:
        return None if env.strip().lower() in DISABLED else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffmem"


def content_key(*parts) -> str:
    """A hash of bytes, strings and arrays, in order."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype, p.shape)).encode())
            p = np.ascontiguousarray(p).tobytes()
        elif isinstance(p, str):
            p = p.encode("utf-8")
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:40]


def load_arrays(kind: str, key: str) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    root = cache_dir()
    path = root / kind / f"{key}.safetensors" if root else None
    if path is None or not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file: recompute and overwrite it
        warnings.warn(f"ignoring unreadable cache entry {path}: {e}", stacklevel=2)
        return None


def save_arrays(kind: str, key: str, arrays: dict[str, np.ndarray]) -> Path | None:
    from safetensors.numpy import save_file

    root = cache_dir()
    if root is None:
        return None
    path = root / kind / f"{key}.safetensors"
    try:
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
    except OSError as e:  # a read-only home, a full disk: the result stands, it just is not kept
        warnings.warn(f"could not write cache entry {path}: {e}", stacklevel=2)
        return None
    return path


def files_fingerprint(source, skip=()) -> str | None:
    """A hash of a local file's or folder's file names, sizes and modification times (files under
    the ``skip`` folders left out); None for anything else (``memlab``, a hub id, a Dataset object)."""
    if not isinstance(source, (str, os.PathLike)) or str(source) == "memlab" or not Path(source).exists():
        return None
    p = Path(source)
    skip = [Path(s).resolve() for s in skip]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()
                                           and not any(f.resolve().is_relative_to(s) for s in skip))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
