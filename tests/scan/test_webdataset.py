"""WebDataset .tar shards (img2dataset's output) as a scan source, checked against the same samples
read as an image folder."""

import json
import tarfile

import numpy as np
import pytest
from shards import SHARD_SAMPLES as SAMPLES
from shards import random_png as _png
from shards import write_tar_shard as _shard

from diffmem.core.errors import InputError
from diffmem.scan import DatasetScanner
from diffmem.scan.report import write_report
from diffmem.scan.sources import ImageFolderSource, WebDatasetSource, open_source


def test_shards_give_the_rows_of_the_same_samples_as_an_image_folder(samples_as_shards_and_folder):
    shards, folder = samples_as_shards_and_folder
    source = open_source(shards)
    assert isinstance(source, WebDatasetSource) and len(source) == len(SAMPLES)
    from_tar, from_folder = source.rows(0, 6), ImageFolderSource(folder).rows(0, 6)
    assert [r.caption for r in from_tar] == [c for _, c in SAMPLES]
    for a, b in zip(from_tar, from_folder):
        assert a.image_issue is None and a.caption_issue is None
        np.testing.assert_array_equal(a.image, b.image)
    # one shard alone is a source too, its rows numbered from 0
    one = open_source(shards / "00001.tar")
    assert [r.caption for r in one.rows(0, 10)] == [c for _, c in SAMPLES[3:]]


def test_a_scan_of_the_shards_finds_the_duplicated_image_as_the_folder_scan_does(samples_as_shards_and_folder, tmp_path):
    shards, folder = samples_as_shards_and_folder
    tar_scan = DatasetScanner(shards, tmp_path / "a", progress=False).scan()
    tar_rows = tar_scan.rows.set_index("row")
    folder_rows = DatasetScanner(folder, tmp_path / "b", progress=False).scan().rows.set_index("row")
    assert tar_rows.loc[0, "image_cluster"] == tar_rows.loc[3, "image_cluster"] >= 0
    np.testing.assert_array_equal(tar_rows["image_cluster"] >= 0, folder_rows["image_cluster"] >= 0)
    # each row says where its image is, as shard:key, so the curator can find the copies
    assert tar_rows.loc[[0, 3], "location"].tolist() == ["00000.tar:000000000", "00001.tar:000000003"]
    assert folder_rows.loc[[0, 3], "location"].tolist() == ["000000000.png", "000000003.png"]
    (cluster,) = tar_scan.info["image_clusters"]
    assert cluster["example_locations"] == ["00000.tar:000000000", "00001.tar:000000003"]
    assert "2 rows, e.g. “a red barn at dawn” / “a red barn at dawn, again”; images: 00000.tar:000000000, " \
           "00001.tar:000000003\n" in write_report(tar_scan, tmp_path / "a", tar_scan.thumbs).read_text()


def test_captions_come_from_the_json_without_a_txt_and_a_sample_may_lack_a_part(tmp_path):
    _shard(tmp_path / "s.tar", [("a.jpg", _png(1)), ("a.json", json.dumps({"caption": "from json"}).encode()),
                                ("b.jpg", _png(2)),  # no caption at all
                                ("c.json", json.dumps({"caption": "no image"}).encode()),
                                ("d.jpg", b"not a jpeg"), ("d.json", json.dumps({"text": "broken"}).encode()),
                                # a null caption is no caption (img2dataset writes one): the text is taken, as train takes it
                                ("e.jpg", _png(5)), ("e.json", json.dumps({"caption": None, "text": "set"}).encode())])
    rows = WebDatasetSource(tmp_path / "s.tar").rows(0, 5)
    assert [(r.caption, r.caption_issue) for r in rows] == [("from json", None), (None, "missing"),
                                                              ("no image", None), ("broken", None), ("set", None)]
    assert rows[0].image is not None and rows[1].image is not None
    assert rows[2].image_issue == "missing image" and rows[3].image_issue.startswith("unreadable image")


def test_bad_shards_and_names_are_refused_clearly(tmp_path):
    _shard(tmp_path / "s.tar", [("a.png", _png(1)), ("a.txt", b"a caption")])
    with pytest.raises(InputError, match=r"no caption files \.cls .*\['png', 'txt'\]"):
        WebDatasetSource(tmp_path / "s.tar", caption_column="cls")
    with pytest.raises(InputError, match=r"no image files \.webp"):
        WebDatasetSource(tmp_path / "s.tar", image_column=".webp")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(InputError, match="junk.tar is not a readable tar file"):
        open_source(tmp_path / "junk.tar")
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "s.tar", arcname="s.tar")
    with pytest.raises(InputError, match="is a compressed tar: .* decompress it to .tar"):
        open_source(tmp_path / "s.tar.gz")
    _shard(tmp_path / "nocaps.tar", [("a.png", _png(1))])
    with pytest.raises(InputError, match=r"has no captions: no sample has a \.txt or \.json file \(files: \['png'\]\)"):
        open_source(tmp_path / "nocaps.tar")
    assert len(open_source(tmp_path / "nocaps.tar", captions=False)) == 1  # read for its images alone
    (tmp_path / "empty").mkdir()
    _shard(tmp_path / "empty" / "0.tar", [])
    with pytest.raises(InputError, match="holds no samples"):
        open_source(tmp_path / "empty")


def test_a_shard_cut_short_after_it_was_indexed_makes_its_lost_rows_unreadable_not_fatal(tmp_path):
    _shard(tmp_path / "s.tar", [("a.png", _png(1)), ("a.txt", b"first"), ("b.png", _png(2)), ("b.txt", b"second")])
    source = WebDatasetSource(tmp_path / "s.tar")
    offset, _ = source.samples[1][2]["png"]
    with open(tmp_path / "s.tar", "r+b") as f:
        f.truncate(offset + 10)
    rows = source.rows(0, 2)
    assert rows[0].image is not None and rows[0].caption == "first"
    assert rows[1].image is None and rows[1].image_issue.startswith("unreadable image: OSError: the shard ends")
    assert rows[1].caption is None and rows[1].caption_issue == "unreadable"
