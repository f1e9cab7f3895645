import copy

import numpy as np
import torch

from diffmem.memlab import dataset as ds
from diffmem.memlab.replication import MemLabReplication, roundtrip_rmse

SMALL = ds.MemLabConfig(verbatim=2, verbatim_copies=2, triggers=2, template_captions=2, control=10, control_images=1,
                        single=5, novel=5, neighbour=2)


def test_cached_training_set_equals_a_fresh_render(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    vae = tiny_pipe.vae
    first = MemLabReplication(ds.build(SMALL), vae)
    entries = list((tmp_path / "memlab_training_set").glob("*.safetensors"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    cached = MemLabReplication(ds.build(SMALL), vae)
    assert entries[0].stat().st_mtime_ns == stamp  # read, not rewritten
    ids, images = ds.build(SMALL).unique_images()  # the ground truth, computed without the cache
    for k in (first, cached):
        assert np.array_equal(k.ids, ids) and torch.equal(k.train, torch.from_numpy(images.reshape(len(images), -1)))
        assert np.array_equal(k.vae_rmse, roundtrip_rmse(vae, images))


def test_another_vae_or_config_is_another_entry(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    vae = tiny_pipe.vae
    base = MemLabReplication(ds.build(SMALL), vae)
    other_vae = copy.deepcopy(vae)
    with torch.no_grad():
        next(other_vae.parameters()).add_(0.01)
    moved = MemLabReplication(ds.build(SMALL), other_vae)
    assert not np.array_equal(moved.vae_rmse, base.vae_rmse)  # recomputed with the changed weights
    ds_other = ds.build(ds.MemLabConfig(**{**SMALL.to_dict(), "seed": 1}))
    MemLabReplication(ds_other, vae)
    assert len(list((tmp_path / "memlab_training_set").glob("*.safetensors"))) == 3


def test_cache_off_writes_nothing(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path)
    MemLabReplication(ds.build(SMALL), tiny_pipe.vae)
    assert not any(tmp_path.iterdir())


def test_a_vae_in_bfloat16_measures_like_the_float32_one(tiny_pipe, tmp_path, monkeypatch):
    # a pipeline loaded with --dtype bfloat16 stopped `diffmem mitigate` and the audit at the replication
    # measure: the images went to its VAE in float32 ("Input type (float) and bias type should be the same")
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    half = copy.deepcopy(tiny_pipe.vae).to(torch.bfloat16)
    dataset = ds.build(SMALL)
    rep = MemLabReplication(dataset, half)
    assert rep.vae_rmse.dtype == np.float32
    full = roundtrip_rmse(tiny_pipe.vae, dataset.unique_images()[1])
    np.testing.assert_allclose(rep.vae_rmse, full, rtol=0.05, atol=2e-3)  # bfloat16 keeps about 3 digits
