"""Measuring a mitigation with the measures a user chose (any model) and its written summary."""

import numpy as np
import pytest

from diffmem.core.errors import InputError
from diffmem.mitigate import MitigationResult
from diffmem.mitigate import measures as M
from diffmem.mitigate.report import measure_with, save_outputs


def _result(before, after, prompts):
    p = len(prompts)
    return MitigationResult("rna", prompts, {"seed": 0}, [0, 1], np.ones(p), np.ones(p), [[] for _ in prompts],
                            np.zeros(p, int), np.ones(p, bool), [q + " 12" for q in prompts],
                            images_before=before, images_after=after)


def test_measure_with_counts_copies_per_prompt_and_names_the_training_row(tmp_path, monkeypatch):
    import diffmem.mitigate.report as report

    monkeypatch.setattr(report, "MEASURE_BATCH", 3)  # batches that cut across prompts
    rng = np.random.default_rng(0)
    train = rng.uniform(size=(6, 32, 32, 3)).astype(np.float32)
    noise = lambda: rng.uniform(size=(32, 32, 3)).astype(np.float32)  # noqa: E731
    # prompt 0: both generations copy training image 4; prompt 1: one of two copies image 2
    before = np.stack([[train[4], train[4]], [noise(), train[2]]])
    after = np.stack([[noise(), noise()], [noise(), noise()]])
    seen = []

    def alignment(images, prompts):
        seen.extend(prompts)
        return np.array([float(im.mean() > 0.0) for im in images])

    res = _result(before, after, ["a copied prompt", "a half copied prompt"])
    m = measure_with(res, M.PixelReplication(train), alignment)
    assert m["replication_before"] == [1.0, 0.5] and m["replication_after"] == [0.0, 0.0]
    assert m["nearest_before"] == [4, 2] and m["nearest_location_before"] == [None, None]  # images in memory: no place
    assert m["similarity_before"][0] == pytest.approx(1.0, abs=1e-5) and m["similarity_after"][0] < 0.5
    assert m["alignment_before"] == [1.0, 1.0]
    # alignment is always against the prompt the user wrote, never the rewrite
    assert seen[:4] == ["a copied prompt"] * 2 + ["a half copied prompt"] * 2 and all(" 12" not in p for p in seen)

    res.measures.update(m)
    res.settings = {**res.settings, "measured_with": {"replication": "pixel correlation of thumbnails"}}
    summary = save_outputs(res, tmp_path / "out")
    assert "replication 0.750 -> 0.000; alignment 1.000 -> 1.000" in summary
    assert "replication: pixel correlation of thumbnails" in summary
    loaded = MitigationResult.load(tmp_path / "out")
    assert loaded.measures["nearest_before"] == [4, 2] and loaded.settings["measured_with"]["replication"].startswith("pixel")
    frame = loaded.to_frame()
    assert list(frame["replication_before"]) == [1.0, 0.5] and "similarity_after" in frame


def test_the_nearest_training_image_of_each_prompt_is_saved_from_the_data(tmp_path):
    # what a replicating prompt copies, to look at beside its generations: read back from the training
    # data (the measure keeps only features), at most 256 pixels a side
    from PIL import Image

    from diffmem.mitigate.report import save_nearest_images

    rng = np.random.default_rng(2)
    (tmp_path / "train").mkdir()
    train = [(rng.uniform(size=(h, w, 3)) * 255).astype(np.uint8) for h, w in ((32, 32), (300, 600), (40, 24))]
    for i, arr in enumerate(train):
        Image.fromarray(arr).save(tmp_path / "train" / f"{i}.png")
    gens = np.stack([[train[2] / 255.0] * 2, [rng.uniform(size=(40, 24, 3))] * 2]).astype(np.float32)
    res = _result(gens, gens, ["a copy", "a novel prompt"])
    for data in (tmp_path / "train", [train[0], train[1], train[2]]):  # a folder, or images in memory
        rep = M.PixelReplication(data)
        res.measures = measure_with(res, rep)
        out = tmp_path / ("listed" if isinstance(data, list) else "folder")
        paths = save_nearest_images(res, rep, out)
        assert [p.name for p in paths] == ["nearest_0000.png", "nearest_0001.png"]
        assert np.array_equal(np.asarray(Image.open(paths[0]).convert("RGB")), train[2])  # the image it copies
        nearest = res.measures["nearest_before"][1]
        assert Image.open(paths[1]).size == ((256, 128) if nearest == 1 else Image.fromarray(train[nearest]).size)
    assert M.PixelReplication(tmp_path / "train").train.image(1).shape == (300, 600, 3)
    # a measure without training images (MemLab's, a caller's own) saves none
    assert save_nearest_images(res, lambda images: {}, tmp_path / "none") == [] and not (tmp_path / "none").exists()
    # and an earlier run's in the same folder are not left to be taken for this run's
    one = _result(gens[:1], gens[:1], ["a copy"])
    one.measures = measure_with(one, rep)
    assert [p.name for p in save_nearest_images(one, rep, out)] == ["nearest_0000.png"]
    assert sorted(p.name for p in out.glob("nearest_*.png")) == ["nearest_0000.png"]
    assert save_nearest_images(one, lambda images: {}, out) == [] and not list(out.glob("nearest_*.png"))


def test_measure_with_only_one_measure_and_without_images():
    rng = np.random.default_rng(1)
    imgs = rng.uniform(size=(1, 2, 16, 16, 3)).astype(np.float32)
    m = measure_with(_result(imgs, imgs, ["a red circle on the left"]), alignment=lambda im, p: np.full(len(im), 0.25))
    assert m == {"alignment_before": [0.25], "alignment_after": [0.25]}
    with pytest.raises(InputError, match="holds no images"):
        measure_with(_result(None, None, ["a"]), M.PixelReplication(imgs[0]))


def test_the_grid_names_each_rewrite_its_measures_and_the_prompts_it_leaves_out(tmp_path):
    rng = np.random.default_rng(0)
    imgs = lambda: rng.uniform(size=(10, 2, 8, 8, 3)).astype(np.float32)  # noqa: E731
    prompts = [f"a long prompt number {i} about a red circle on the left in a quiet park with a tall tree" for i in range(10)]
    res = _result(imgs(), imgs(), prompts)
    res.mitigated_prompts[3] = prompts[3]  # a prompt left as it was
    res.measures = {"replication_before": [1.0] * 10, "replication_after": [0.25] * 10}
    fig = res._grid_figure(max_prompts=8)
    assert "first 8 of 10 prompts" in fig._suptitle.get_text()
    axes = np.asarray(fig.axes).reshape(8, 4)
    assert axes[0, 0].get_ylabel().replace("\n", " ") == "a long prompt number 0 about a red circle on the left in a quiet park …"
    assert axes[0, 2].get_xlabel() == "+ 12"  # the rewrite the after images were made from
    assert axes[3, 2].get_xlabel() == ""
    assert axes[0, 3].get_ylabel() == "replication 1.00 → 0.25"
    assert res.plot_grid(tmp_path / "g.png").stat().st_size > 1000
