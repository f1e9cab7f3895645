import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.core.components import tiny_pipeline
from diffmem.core.errors import InputError
from diffmem.train import latents as latents_module
from diffmem.train.latents import encode_source


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1)


def _folder(path, n=11, broken=(4,)):
    path.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if i in broken:
            (path / f"{i}.png").write_bytes(b"not a png")
        else:
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


class Counting:
    """Wraps encode_images: counts the chunks encoded, and can stop the run at the k-th."""

    def __init__(self, monkeypatch, stop_at=None):
        self.calls, self.stop_at, real = 0, stop_at, latents_module.encode_images

        def encode(pipe, images):
            self.calls += 1
            if self.stop_at is not None and self.calls == self.stop_at:
                raise KeyboardInterrupt
            return real(pipe, images)

        monkeypatch.setattr(latents_module, "encode_images", encode)


def test_saved_parts_equal_an_unsaved_encoding_and_a_rerun_encodes_nothing(tmp_path, pipe, monkeypatch):
    data = str(_folder(tmp_path / "data"))
    plain = encode_source(pipe, data, 16, chunk=3)
    counter = Counting(monkeypatch)
    saved = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    assert counter.calls == 4 and len(list((tmp_path / "latents").glob("part-*.safetensors"))) == 4  # 10 rows, 3 a chunk
    assert torch.equal(plain[0], saved[0]) and plain[1:] == saved[1:]
    assert [(p["row"], p["problem"]) for p in saved[2]] == [(4, "unreadable image: UnidentifiedImageError")]
    again = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    assert counter.calls == 4  # nothing encoded twice
    assert torch.equal(again[0], plain[0]) and again[1:] == plain[1:]


def test_a_killed_encoding_resumes_after_its_last_saved_part(tmp_path, pipe, monkeypatch):
    data = str(_folder(tmp_path / "data"))
    plain = encode_source(pipe, data, 16, chunk=3)
    Counting(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    assert len(list((tmp_path / "latents").glob("part-*.safetensors"))) == 2
    counter = Counting(monkeypatch)
    resumed = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    assert counter.calls == 2
    assert torch.equal(resumed[0], plain[0]) and resumed[1:] == plain[1:]


def test_changed_data_is_encoded_again_or_refused_when_a_checkpoint_depends_on_it(tmp_path, pipe, monkeypatch):
    folder = _folder(tmp_path / "data")
    encode_source(pipe, str(folder), 16, folder=tmp_path / "latents", chunk=3)
    Image.new("RGB", (20, 24), "red").save(folder / "0.png")  # one image replaced in place
    os.utime(folder / "0.png", ns=(1, 1))
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "latents").iterdir())
    with pytest.raises(InputError, match=r"other data \(differs in: files\)"):
        encode_source(pipe, str(folder), 16, folder=tmp_path / "latents", chunk=3, replace=False)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "latents").iterdir()) == before
    counter = Counting(monkeypatch)
    latents, captions, _ = encode_source(pipe, str(folder), 16, folder=tmp_path / "latents", chunk=3)
    assert counter.calls == 4
    assert torch.equal(latents, encode_source(pipe, str(folder), 16, chunk=3)[0])


def test_an_output_folder_inside_the_data_does_not_change_its_fingerprint(tmp_path, pipe, monkeypatch):
    data = _folder(tmp_path / "data")
    for run in (data / "run", data):  # --out inside the data folder, or the data folder itself
        encode_source(pipe, str(data), 16, folder=run / "latents", chunk=3)
        (run / "data_problems.json").write_text("[]")  # what a training run writes beside its latents
        (run / "checkpoint").mkdir()
        (run / "checkpoint" / "state.json").write_text("{}")
        counter = Counting(monkeypatch)
        encode_source(pipe, str(data), 16, folder=run / "latents", chunk=3, replace=False)
        assert counter.calls == 0


def test_a_damaged_part_is_encoded_again_from_there(tmp_path, pipe, monkeypatch):
    data = str(_folder(tmp_path / "data"))
    plain = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    (tmp_path / "latents" / "part-000002.safetensors").write_bytes(b"garbage")
    counter = Counting(monkeypatch)
    again = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)
    assert counter.calls == 2
    assert torch.equal(again[0], plain[0]) and again[1:] == plain[1:]


def test_memlab_and_missing_sources_save_nothing(tmp_path):
    assert latents_module.source_fingerprint("memlab") is None
    assert latents_module.source_fingerprint(str(tmp_path / "nope")) is None


def test_a_vae_whose_encoder_alone_changed_encodes_again(tmp_path, monkeypatch):
    # the key read the VAE's first 8 tensors by name, all in its decoder: a VAE with another encoder and
    # the same decoder reused the latents of the first
    import copy

    data = str(_folder(tmp_path / "data"))
    first = tiny_pipeline(seed=1)
    encode_source(first, data, 16, folder=tmp_path / "latents", chunk=3)
    other = copy.copy(first)
    other.vae = copy.deepcopy(first.vae)
    with torch.no_grad():
        other.vae.encoder.conv_out.weight.mul_(1.5)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "latents").iterdir())
    with pytest.raises(InputError, match=r"other data \(differs in: vae\)"):
        encode_source(other, data, 16, folder=tmp_path / "latents", chunk=3, replace=False)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "latents").iterdir()) == before
    counter = Counting(monkeypatch)
    latents = encode_source(other, data, 16, folder=tmp_path / "latents", chunk=3)[0]
    assert counter.calls == 4
    assert torch.equal(latents, encode_source(other, data, 16, chunk=3)[0])
    assert not torch.equal(latents, encode_source(first, data, 16, chunk=3)[0])


def test_latents_saved_with_the_older_key_are_still_reused_and_keyed_anew(tmp_path, pipe, monkeypatch):
    # a training run in progress depends on its latents: a key written before the VAE's whole fingerprint
    # was in it still matches the same VAE, and from then on names the whole fingerprint
    data = str(_folder(tmp_path / "data"))
    plain = encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3)[0]
    key_file = tmp_path / "latents" / "key.json"
    key = json.loads(key_file.read_text())
    assert key.pop("vae_weights")
    key_file.write_text(json.dumps(key))
    counter = Counting(monkeypatch)
    assert torch.equal(encode_source(pipe, data, 16, folder=tmp_path / "latents", chunk=3, replace=False)[0], plain)
    assert counter.calls == 0
    assert "vae_weights" in json.loads(key_file.read_text())


def test_an_older_key_refused_for_other_data_does_not_blame_the_vae(tmp_path, pipe):
    # the older key has no whole-VAE fingerprint to compare: the refusal named the VAE beside the files
    folder = _folder(tmp_path / "data")
    encode_source(pipe, str(folder), 16, folder=tmp_path / "latents", chunk=3)
    key_file = tmp_path / "latents" / "key.json"
    key = json.loads(key_file.read_text())
    del key["vae_weights"]
    key_file.write_text(json.dumps(key))
    Image.new("RGB", (20, 24), "red").save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1, 1))
    with pytest.raises(InputError, match=r"other data \(differs in: files\)"):
        encode_source(pipe, str(folder), 16, folder=tmp_path / "latents", chunk=3, replace=False)


def test_a_named_image_column_is_read_and_keys_the_latents(tmp_path, pipe, monkeypatch):
    # diffmem train had no --image-column, which the scan has: a table whose images are in a column of
    # another name could be scanned but not trained on
    import pandas as pd

    folder = _folder(tmp_path / "data", n=4, broken=())
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    table = folder / "table.csv"
    pd.DataFrame({"picture": [r["file_name"] for r in rows], "caption": [r["text"] for r in rows]}).to_csv(table, index=False)
    with pytest.raises(InputError, match="no image column"):
        encode_source(pipe, str(table), 16)
    named = encode_source(pipe, str(table), 16, folder=tmp_path / "latents", chunk=3, image_column="picture")
    assert torch.equal(named[0], encode_source(pipe, str(folder), 16, chunk=3)[0]) and named[1] == [r["text"] for r in rows]
    assert json.loads((tmp_path / "latents" / "key.json").read_text())["image_column"] == "picture"
    # latents keyed before an image column could be named are the default's: reused, and keyed anew
    plain = tmp_path / "plain"
    first = encode_source(pipe, str(folder), 16, folder=plain / "latents", chunk=3)[0]
    key = json.loads((plain / "latents" / "key.json").read_text())
    assert key.pop("image_column") is None
    (plain / "latents" / "key.json").write_text(json.dumps(key))
    counter = Counting(monkeypatch)
    assert torch.equal(encode_source(pipe, str(folder), 16, folder=plain / "latents", chunk=3, replace=False)[0], first)
    assert counter.calls == 0 and json.loads((plain / "latents" / "key.json").read_text())["image_column"] is None
    # naming another column is other data to a checkpoint that depends on these latents
    with pytest.raises(InputError, match=r"other data \(differs in: image_column\)"):
        encode_source(pipe, str(folder), 16, folder=plain / "latents", chunk=3, replace=False, image_column="file_name")
