import numpy as np
import pytest

from diffmem.core import cache


def test_key_changes_with_every_part_and_its_boundaries():
    a = np.arange(4, dtype=np.float32)
    base = cache.content_key("x", a)
    assert cache.content_key("x", a) == base
    assert cache.content_key("y", a) != base
    assert cache.content_key("x", a + 1) != base
    assert cache.content_key("x", a.astype(np.float64)) != base  # same values, another dtype
    assert cache.content_key("ab", "c") != cache.content_key("a", "bc")


def test_save_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    arrays = {"ids": np.array([3, 1, 2]), "x": np.random.default_rng(0).random((2, 3)).astype(np.float32)}
    path = cache.save_arrays("kind", "k1", arrays)
    assert path == tmp_path / "kind" / "k1.safetensors"
    back = cache.load_arrays("kind", "k1")
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert cache.load_arrays("kind", "other") is None


def test_unreadable_entry_is_recomputed_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    (tmp_path / "kind").mkdir()
    (tmp_path / "kind" / "k1.safetensors").write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        assert cache.load_arrays("kind", "k1") is None


def test_disabled_and_unwritable(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", "off")
    assert cache.cache_dir() is None
    assert cache.save_arrays("kind", "k1", {"a": np.zeros(2)}) is None and cache.load_arrays("kind", "k1") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("DIFFMEM_CACHE", str(blocker / "cache"))  # a file's child: never writable
    with pytest.warns(UserWarning, match="could not write cache entry"):
        assert cache.save_arrays("kind", "k1", {"a": np.zeros(2)}) is None
    monkeypatch.delenv("DIFFMEM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "diffmem"
