import tarfile

import numpy as np
import pytest
import torch

from diffmem.core.errors import InputError
from diffmem.mitigate import measures as M


def test_max_cosine_against_brute_force():
    rng = np.random.default_rng(0)
    g, t = rng.normal(size=(5, 7)), rng.normal(size=(9, 7))
    sim, idx = M.max_cosine(torch.tensor(g), torch.tensor(t))
    ref = (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    np.testing.assert_allclose(sim, ref.max(1), rtol=1e-5)
    assert (idx == ref.argmax(1)).all()


def test_pixel_replication_finds_copies_not_strangers():
    rng = np.random.default_rng(0)
    train = rng.uniform(size=(10, 32, 32, 3)).astype(np.float32)
    copies = np.clip(train[[3, 7]] + rng.normal(0, 0.01, size=(2, 32, 32, 3)), 0, 1)
    strangers = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    cls = M.PixelReplication(train)
    out = cls(np.concatenate([copies, strangers]))
    assert list(out["replicated"]) == [True, True, False, False] and list(out["nearest"][:2]) == [3, 7]
    np.testing.assert_allclose(M.pixel_replication(copies, train)["similarity"], out["similarity"][:2])


def test_sscd_preprocessing_shape_and_normalisation():
    x = M.sscd_preprocess(np.full((2, 300, 400, 3), 0.5, np.float32))
    assert x.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(x[0, :, 100, 100].numpy(), (0.5 - np.array(M.IMAGENET_MEAN)) / np.array(M.IMAGENET_STD), rtol=1e-4)


def test_sscd_with_a_torchscript_stand_in(sscd_stand_in):
    path = sscd_stand_in
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's jit.load deprecation is not the user's to act on: SSCD is TorchScript
        M.load_torchscript(path)
    rng = np.random.default_rng(1)
    train = rng.uniform(size=(4, 64, 64, 3)).astype(np.float32)
    out = M.SSCDReplication(path, train)(train[:2])
    np.testing.assert_allclose(out["similarity"], 1.0, rtol=1e-5)
    assert list(out["nearest"]) == [0, 1]


def test_sscd_bad_paths(tmp_path):
    with pytest.raises(InputError, match="not found"):
        M.load_torchscript(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not torchscript")
    with pytest.raises(InputError, match="not a TorchScript model"):
        M.load_torchscript(bad)


def test_memlab_alignment_reads_named_features():
    from diffmem.memlab import world

    img = world.render(world.Scene("red", "circle", "left", background_seed=3))
    assert M.memlab_alignment(img[None], ["a red circle on the left"])[0] == 1.0
    assert M.memlab_alignment(img[None], ["a blue circle on the left"])[0] == pytest.approx(2 / 3)


def test_alignment_summary_counts_only_prompts_that_name_attributes():
    import warnings

    from diffmem.mitigate.report import _mean_of_named, alignment_text

    per_generation = np.array([[1.0, 0.5], [np.nan, np.nan], [0.0, np.nan]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" reached the terminal as a warning
        means = _mean_of_named(per_generation)
    np.testing.assert_array_equal(means, [0.75, np.nan, 0.0])
    assert alignment_text(means, [1.0, np.nan, 0.5]) == "alignment 0.375 -> 0.750 (over the 2 of 3 prompts that name MemLab attributes)"
    assert alignment_text([0.5], [1.0]) == "alignment 0.500 -> 1.000"
    assert alignment_text([np.nan], [np.nan]) == "alignment not measured (no prompt names a MemLab attribute)"


def test_integer_images_are_scaled_by_their_dtype_so_a_dark_image_stays_dark():
    """A uint8 image whose values stay at or under 1 was taken as [0, 1] floats: nearly black read as white."""
    dark = np.zeros((1, 16, 16, 3), np.uint8)
    dark[0, 4:8] = 1
    as_float = dark.astype(np.float32) / 255.0
    torch.testing.assert_close(M._to_nchw(dark), M._to_nchw(as_float))
    torch.testing.assert_close(M.sscd_preprocess(dark), M.sscd_preprocess(as_float))
    wide = (dark.astype(np.uint16) * 257)  # 16-bit: 257 / 65535 == 1 / 255
    torch.testing.assert_close(M._to_nchw(wide), M._to_nchw(as_float))
    bright = np.full((1, 16, 16, 3), 200, np.uint8)  # float images past 1 are still read as 0..255
    torch.testing.assert_close(M._to_nchw(bright.astype(np.float32)), M._to_nchw(bright))


def test_bad_image_batches_are_named():
    with pytest.raises(ValueError, match="NaN or inf"):
        M._to_nchw(np.full((1, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        M._to_nchw(np.zeros((2, 8, 8), np.float32))


def test_alignment_takes_one_prompt_per_image_and_a_string_as_one_prompt():
    from diffmem.memlab import world

    img = world.render(world.Scene("red", "circle", "left", background_seed=3))
    # a bare string was read letter by letter, and zip dropped the images past the prompts unsaid
    assert M.memlab_alignment(img[None], "a red circle on the left")[0] == 1.0
    assert M.memlab_alignment(img, "a red circle on the left")[0] == 1.0
    with pytest.raises(InputError, match="2 image\\(s\\) and 1 prompt"):
        M.memlab_alignment(np.stack([img, img]), ["a red circle on the left"])


def _training_folder(folder, sizes=((40, 40), (48, 32), (40, 56), (40, 40)), seed=3):
    """Random RGB images of several sizes as PNGs, their arrays, and one broken file among them."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    arrays = []
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
        arrays.append(arr)
    (folder / "img_2b_broken.png").write_bytes(b"not a png")  # sorts between img_2 and img_3: row 3
    return arrays


def test_a_training_folder_is_measured_without_holding_a_shard_of_full_size_images(tmp_path, monkeypatch,
                                                                                    sscd_stand_in):
    # a shard of 32 photos was decoded whole before any was featurized: 4.6 GB of float32 pixels at 12
    # megapixels; each is now prepared (thumbnail, SSCD's 224 x 224 crop) as it is read, to the same features
    from doubles import count_live_decoded_images

    monkeypatch.setenv("DIFFMEM_CACHE", "off")
    arrays = _training_folder(tmp_path / "train", sizes=((40, 40), (48, 32), (300, 260), (40, 56), (64, 64)))
    decoded, most_alive = count_live_decoded_images(monkeypatch)
    pixel = M.PixelReplication(tmp_path / "train")
    sscd = M.SSCDReplication(sscd_stand_in, tmp_path / "train", batch_size=2)
    assert len(decoded) == 10 and max(most_alive) == 0, most_alive  # 5 images, once for each measure
    for measure in (pixel, sscd):
        assert list(measure.train.rows) == [0, 1, 2, 4, 5] and [r for r, _ in measure.train.skipped] == [3]
    full = [a.astype(np.float32) / 255.0 for a in arrays]
    torch.testing.assert_close(pixel.train.features, M.PixelReplication.thumbs(full), rtol=0, atol=0)
    torch.testing.assert_close(sscd.train.features, sscd.embed(full), rtol=0, atol=0)


def test_training_images_from_a_folder_map_generations_to_their_rows(tmp_path):
    arrays = _training_folder(tmp_path / "train")
    rep = M.PixelReplication(tmp_path / "train")
    assert list(rep.train.rows) == [0, 1, 2, 4] and [r for r, _ in rep.train.skipped] == [3]
    assert "unreadable image" in rep.train.skipped[0][1] and "1 unreadable left out; row 3" in rep.describe()
    # the same images as an in-memory list (sizes differ) give the same features
    listed = M.PixelReplication(arrays)
    torch.testing.assert_close(listed.train.features, rep.train.features)
    gens = np.stack([np.asarray(arrays[3], np.float32) / 255.0, np.random.default_rng(9).uniform(size=(40, 40, 3))])
    out = rep(gens)
    assert list(out["replicated"]) == [True, False] and out["nearest"][0] == 4  # row 4 of the folder, the 4th readable
    assert out["similarity"][0] == pytest.approx(1.0, abs=1e-5)
    # where the nearest image is, for the curator to open it: the folder's file; images given in memory have no place
    assert out["location"][0] == "img_3.png" and rep.train.locations == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    assert listed(gens)["location"] == [None, None]


def test_sscd_reads_a_training_folder_in_shards(tmp_path, sscd_stand_in):
    model = sscd_stand_in
    arrays = _training_folder(tmp_path / "train")
    rep = M.SSCDReplication(model, tmp_path / "train", batch_size=2)
    whole = M.SSCDReplication(model, [arrays[i] for i in (0, 1, 2, 3)], batch_size=3)
    torch.testing.assert_close(rep.train.features, whole.train.features)
    out = rep([arrays[1]])
    assert out["nearest"][0] == 1 and out["similarity"][0] == pytest.approx(1.0, abs=1e-5) and out["replicated"][0]


def test_training_images_that_cannot_serve_are_named(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="none of its 1 images can be read \\(row 0: unreadable image"):
        M.PixelReplication(tmp_path / "broken")
    with pytest.raises(InputError, match="dataset not found"):
        M.PixelReplication(tmp_path / "missing")
    table = tmp_path / "captions.csv"
    table.write_text("caption\na red circle\n")
    with pytest.raises(InputError, match="no images to compare"):
        M.PixelReplication(table)
    with pytest.raises(InputError, match="no training images"):
        M.PixelReplication(np.zeros((0, 8, 8, 3), np.float32))
    # a data set of zero rows was refused in the scan's words, "nothing to scan"
    (tmp_path / "header.csv").write_text("image,caption\n")
    tarfile.open(tmp_path / "empty.tar", "w").close()
    for name, empty in (("header.csv", "has zero rows"), ("empty.tar", "holds no samples")):
        with pytest.raises(InputError, match=f"{name} {empty}: no training images to compare generations with$"):
            M.PixelReplication(tmp_path / name)


def _count_featurized_shards(monkeypatch) -> list:
    """The rows of each shard featurized from now on (not read back from the cache), in order."""
    calls = []
    real = M._featurize_shard

    def counting(batch, featurize, batch_size):
        calls.append([r.row for r in batch])
        return real(batch, featurize, batch_size)

    monkeypatch.setattr(M, "_featurize_shard", counting)
    return calls


def test_training_features_are_cached_by_shard_and_a_killed_run_redoes_one(tmp_path, monkeypatch):
    """Reading and embedding a real training set is the slow part of measuring (SSCD on a CPU): a rerun
    reads the features back, a run killed midway keeps the shards it finished, and changed data or
    other weights are never served stale features."""
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    arrays = _training_folder(tmp_path / "train", sizes=((32, 32),) * 5)
    calls = _count_featurized_shards(monkeypatch)
    first = M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert calls == [[0, 1], [2, 3], [4, 5]] and [r for r, _ in first.skipped] == [3]
    calls.clear()
    again = M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert calls == [] and again.skipped == first.skipped and list(again.rows) == list(first.rows)
    torch.testing.assert_close(again.features, first.features)
    assert again.locations == first.locations == [f"img_{i}.png" for i in range(5)]
    # entries cached before they kept the images' locations are made again, once
    from safetensors.numpy import load_file, save_file

    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 3
    for entry in entries:
        save_file({k: v for k, v in load_file(str(entry)).items() if k != "locations"}, str(entry))
    remade = M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert remade.locations == first.locations
    assert len(calls) == 3
    calls.clear()
    M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert calls == []
    # another featurizer identity (other SSCD weights) has entries of its own
    M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="other")
    assert len(calls) == 3
    calls.clear()

    # killed while reading the second shard: the rerun reads shard 1 back and computes the rest
    from PIL import Image

    Image.fromarray(arrays[0][::-1].copy()).save(tmp_path / "train" / "img_0.png")  # changed data: new entries

    counting = M._featurize_shard  # the helper's counting stand-in

    def dies_on_row_2(batch, featurize, batch_size):
        if batch[0].row == 2:
            raise KeyboardInterrupt
        return counting(batch, featurize, batch_size)

    monkeypatch.setattr(M, "_featurize_shard", dies_on_row_2)
    with pytest.raises(KeyboardInterrupt):
        M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert calls == [[0, 1]]
    calls.clear()
    monkeypatch.setattr(M, "_featurize_shard", counting)
    resumed = M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert calls == [[2, 3], [4, 5]]
    fresh = M.TrainingImages([np.asarray(Image.open(tmp_path / "train" / f"img_{i}.png")) for i in range(5)],
                             M.PixelReplication.thumbs)
    torch.testing.assert_close(resumed.features, fresh.features)  # the changed image, not its stale features

    monkeypatch.setenv("DIFFMEM_CACHE", "off")  # no cache: computed every time, nothing written
    calls.clear()
    M.TrainingImages(tmp_path / "train", M.PixelReplication.thumbs, shard_size=2, identity="pixel")
    assert len(calls) == 3


def test_image_only_tables_and_datasets_need_no_caption_column(tmp_path):
    """Replication compares images alone: a table or saved dataset without captions was refused with a
    hint about --caption-column, an option diffmem mitigate does not have."""
    import datasets
    import pandas as pd

    arrays = _training_folder(tmp_path / "train")
    names = [f"img_{i}.png" for i in range(4)]
    pd.DataFrame({"image": names}).to_csv(tmp_path / "train" / "images.csv", index=False)
    datasets.Dataset.from_dict({"image": [str(tmp_path / "train" / n) for n in names]}).save_to_disk(str(tmp_path / "saved"))
    in_memory = M.PixelReplication(arrays).train.features
    for data in (tmp_path / "train" / "images.csv", tmp_path / "saved"):
        rep = M.PixelReplication(data)
        assert list(rep.train.rows) == [0, 1, 2, 3] and not rep.train.skipped
        torch.testing.assert_close(rep.train.features, in_memory)
    from diffmem.scan.sources import open_source

    with pytest.raises(InputError, match="no caption column"):  # the scan still needs its captions
        open_source(tmp_path / "train" / "images.csv")


def test_a_measure_of_a_later_revision_does_not_read_an_earlier_ones_cached_features(tmp_path, monkeypatch):
    # the cached training features were named by the featurizer alone: a measure whose features change
    # would have been served the earlier ones
    from doubles import bump_revision

    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path / "cache"))
    _training_folder(tmp_path / "train", sizes=((32, 32),) * 3)
    calls = _count_featurized_shards(monkeypatch)
    M.PixelReplication(tmp_path / "train")
    M.PixelReplication(tmp_path / "train")
    assert len(calls) == 1  # the second read them back
    bump_revision(monkeypatch, M.PixelReplication)
    M.PixelReplication(tmp_path / "train")
    assert len(calls) == 2
