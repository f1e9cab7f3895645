import io
import json
import re
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmem.core.errors import InputError
from diffmem.scan.sources import open_source
from diffmem.train.data import describe_problem, load_pairs


def _png(colour, size=20):
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 4), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    (d / "a.png").write_bytes(_png((255, 0, 0)))
    (d / "b.png").write_bytes(_png((0, 0, 255)))
    (d / "broken.png").write_bytes(b"not a png at all")
    (d / "c.png").write_bytes(_png((0, 255, 0)))
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "b.png", "text": "a blue square"},
            {"file_name": "broken.png", "text": "corrupt"}, {"file_name": "c.png", "text": "  "}]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def test_image_folder_with_bad_rows_recorded_not_fatal(image_folder):
    images, captions, problems = load_pairs(str(image_folder), 16)
    assert captions == ["a red square", "a blue square"]
    assert images.shape == (2, 16, 16, 3)
    assert np.allclose(images[0, 8, 8], [1, 0, 0], atol=0.02)
    kinds = sorted(p["problem"].split(":")[0] for p in problems)
    assert kinds == ["empty caption", "unreadable image"]


def test_an_unreadable_image_problem_row_names_the_file_and_the_reason(image_folder):
    # the rows said "unreadable image: FileNotFoundError" and no more: with thousands of rows the
    # curator could not tell which file to mend, where the scan's rows say it
    (image_folder / "a.png").unlink()
    _, _, problems = load_pairs(str(image_folder), 16)
    by_row = {p["row"]: p for p in problems}
    assert by_row[0]["problem"] == "unreadable image: FileNotFoundError" and "a.png" in by_row[0]["detail"]
    assert by_row[2]["problem"] == "unreadable image: UnidentifiedImageError" and "broken.png" in by_row[2]["detail"]
    assert describe_problem(by_row[0]).startswith("unreadable image: FileNotFoundError (") and "a.png" in describe_problem(by_row[0])
    assert describe_problem({"row": 3, "problem": "empty caption"}) == "empty caption"


def test_pairs_come_in_chunks_that_add_up_to_the_whole(image_folder):
    from diffmem.train.data import iter_pairs

    for colour in ("white", "black", "yellow"):
        (image_folder / f"{colour}.png").write_bytes(_png(colour))
    rows = [json.loads(line) for line in (image_folder / "metadata.jsonl").read_text().splitlines()]
    rows += [{"file_name": f"{c}.png", "text": f"a {c} square"} for c in ("white", "black", "yellow")]
    (image_folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    problems = []
    chunks = iter_pairs(str(image_folder), 16, chunk=2, problems=problems)
    first_images, first_captions, first_next = next(chunks)
    assert first_captions == ["a red square", "a blue square"] and first_images.shape == (2, 16, 16, 3)
    assert first_next == 2 and problems == []  # nothing past the first chunk has been read yet
    rest = list(chunks)
    assert [(len(c), n) for _, c, n in rest] == [(2, 6), (1, 7)]  # rows 2 and 3 are problems
    whole, captions, whole_problems = load_pairs(str(image_folder), 16)
    assert captions == first_captions + [c for _, cs, _ in rest for c in cs]
    np.testing.assert_array_equal(whole, np.concatenate([first_images] + [i for i, _, _ in rest]))
    # picking up at a chunk's next row reads the rest of the source and nothing before it
    later = list(iter_pairs(str(image_folder), 16, chunk=2, start=first_next))
    assert [c for _, cs, _ in later for c in cs] == captions[2:]
    assert list(iter_pairs(str(image_folder), 16, start=7)) == []
    assert problems == whole_problems and len(problems) == 2


def test_a_decompression_bomb_is_a_problem_row_not_a_crash(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    Image.new("1", (20000, 9100)).save(d / "bomb.png")  # 22 kB on disk, 182 M pixels: past Pillow's limit
    (d / "ok.png").write_bytes(_png((255, 0, 0)))
    rows = [{"file_name": "bomb.png", "text": "a bomb"}, {"file_name": "ok.png", "text": "a red square"}]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    images, captions, problems = load_pairs(str(d), 8)
    assert captions == ["a red square"] and images.shape == (1, 8, 8, 3)
    assert [(p["row"], p["problem"]) for p in problems] == [(0, "unreadable image: DecompressionBombError")]
    assert "exceeds limit" in problems[0]["detail"]


def test_a_caption_that_is_not_text_is_named_so(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"image": [{"bytes": _png((255, 255, 0)), "path": None}] * 2, "caption": ["yellow", "x"]})
    df.to_parquet(tmp_path / "d.parquet")
    df.assign(caption=[7, 8]).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"2 problem rows, the first: row 0, caption not text \(int\)"):
        load_pairs(str(tmp_path / "n.parquet"), 8)
    df.assign(caption=["yellow", None]).to_parquet(tmp_path / "m.parquet")
    _, captions, problems = load_pairs(str(tmp_path / "m.parquet"), 8)
    assert captions == ["yellow"] and problems == [{"row": 1, "problem": "empty caption"}]


def test_parquet_with_image_bytes(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"image": [{"bytes": _png((255, 255, 0)), "path": None}], "caption": ["yellow"]})
    p = tmp_path / "d.parquet"
    df.to_parquet(p)
    images, captions, _ = load_pairs(str(p), 8)
    assert captions == ["yellow"] and images.shape == (1, 8, 8, 3)


def test_jsonl_with_image_paths(tmp_path):
    (tmp_path / "x.png").write_bytes(_png((0, 0, 0)))
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"image": "x.png", "prompt": "black"}) + "\n")
    _, captions, _ = load_pairs(str(p), 8)
    assert captions == ["black"]


def test_saved_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (9, 9, 9))], "text": ["grey"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    _, captions, _ = load_pairs(str(tmp_path / "saved"), 8)
    assert captions == ["grey"]


def test_missing_caption_column_and_missing_metadata(tmp_path, image_folder):
    with pytest.raises(InputError, match="no caption column 'label'"):
        load_pairs(str(image_folder), 8, caption_column="label")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no metadata.jsonl"):
        load_pairs(str(empty), 8)


@pytest.mark.parametrize("source", ["nope", "data/sub/folder", "./captions", "../captions"])
def test_a_missing_local_source_fails_without_asking_the_hub(tmp_path, monkeypatch, source):
    # not an owner/name id: before this check, datasets tried the hub for half a minute first
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("asked the hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(InputError, match=f"training data not found: {source}"):
        load_pairs(source, 8)


def test_a_hub_shaped_id_still_goes_to_datasets(monkeypatch):
    import datasets

    asked = []

    def offline_hub(name, split):
        asked.append(name)
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    with pytest.raises(InputError, match="could not read training data 'owner/captions'.*ConnectionError"):
        load_pairs("owner/captions", 8)
    assert asked == ["owner/captions"]


def test_an_error_without_words_from_datasets_is_still_a_one_line_error(monkeypatch):
    # an exception with an empty message made the error's own wording fail (IndexError), a traceback
    import datasets

    def timed_out(name, split):
        raise TimeoutError()

    monkeypatch.setattr(datasets, "load_dataset", timed_out)
    with pytest.raises(InputError, match="could not read training data 'owner/captions': TimeoutError$"):
        load_pairs("owner/captions", 8)


def test_relative_paths_as_datasets_exports_them_and_empty_image_cells(tmp_path, monkeypatch):
    # ``Dataset.to_parquet`` writes an image loaded from a relative path as {"bytes": None, "path": ...}:
    # that path was opened against the working directory, so the table failed anywhere but beside it
    import pandas as pd

    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "red.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "blue.png").write_bytes(_png((0, 0, 255)))  # relative to where the table was built
    p = tmp_path / "data" / "d.parquet"
    pd.DataFrame({"image": [{"bytes": None, "path": "imgs/red.png"}, {"bytes": None, "path": "blue.png"},
                            {"bytes": None, "path": None}, None],
                  "text": ["red", "blue", "no image", "none at all"]}).to_parquet(p)
    monkeypatch.chdir(tmp_path)
    images, captions, problems = load_pairs(str(p), 8)
    assert captions == ["red", "blue"]
    assert images[0, 0, 0].tolist() == [1.0, 0.0, 0.0] and images[1, 0, 0].tolist() == [0.0, 0.0, 1.0]
    # an empty image cell stopped the run with AttributeError
    assert problems == [{"row": 2, "problem": "missing image"}, {"row": 3, "problem": "missing image"}]
    monkeypatch.chdir(tmp_path / "data")
    _, captions, problems = load_pairs(str(p.name), 8)
    assert captions == ["red"] and problems[0]["row"] == 1
    assert problems[0]["problem"] == "unreadable image: FileNotFoundError" and "blue.png is in neither" in problems[0]["detail"]


def test_an_image_cell_of_another_type_or_blank_is_a_problem_row_not_a_crash(tmp_path):
    # an int or a list in the image column stopped the run with Pillow's AttributeError ('int' object
    # has no attribute 'read'), and a blank path opened the table's folder as an image
    (tmp_path / "x.png").write_bytes(_png((0, 0, 0)))
    rows = [{"image": "x.png", "text": "black"}, {"image": 7, "text": "a number"}, {"image": "", "text": "blank"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _, captions, problems = load_pairs(str(tmp_path / "d.jsonl"), 8)
    assert captions == ["black"]
    assert [(p["row"], p["problem"]) for p in problems] == [(1, "unreadable image: TypeError"), (2, "missing image")]
    assert "not int" in problems[0]["detail"] and "detail" not in problems[1]


def test_a_csv_table_trains_as_the_scan_reads_it(tmp_path):
    # a curator's .csv of paths and captions could be scanned but not trained on ("use a folder,
    # .parquet or .jsonl"); its suffix is read in any case, as the scan reads it
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "r.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "d.CSV").write_text('image,text\nimgs/r.png,"a red square, small"\n,no image\nimgs/r.png,\n')
    images, captions, problems = load_pairs(str(tmp_path / "d.CSV"), 8)
    assert captions == ["a red square, small"] and images[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert problems == [{"row": 1, "problem": "missing image"}, {"row": 2, "problem": "empty caption"}]
    (tmp_path / "d.xlsx").write_text("image\ttext\n")
    with pytest.raises(InputError, match=r"unsupported data file d.xlsx: use a folder, .parquet, .jsonl, .json, .csv, .tsv "
                                         "or WebDataset .tar shards"):
        load_pairs(str(tmp_path / "d.xlsx"), 8)
    (tmp_path / "header.csv").write_text("image,text\n")
    with pytest.raises(InputError, match=r"header.csv has zero rows: nothing to train on"):  # was datasets' 'Instruction "train" corresponds to no data!'
        load_pairs(str(tmp_path / "header.csv"), 8)


def test_a_table_or_folder_without_rows_is_named_as_such(tmp_path):
    # datasets' words for these were "StopIteration", "IndexError: list index out of range" and
    # "ArrowInvalid: BatchSize must be greater than 0, got 0": the scan's reader names them empty
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "header.tsv").write_text("image\ttext\n")
    pd.DataFrame({"image": pd.Series([], dtype=object), "text": pd.Series([], dtype=str)}).to_parquet(tmp_path / "z.parquet")
    for folder, metadata, text in [("f", "metadata.csv", "file_name,text\n"), ("g", "metadata.jsonl", "")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / metadata).write_text(text)
    for source, empty in [("e.jsonl", "e.jsonl"), ("header.tsv", "header.tsv"), ("z.parquet", "z.parquet"),
                          ("f", "f/metadata.csv"), ("g", "g/metadata.jsonl")]:
        with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / empty))} has zero rows: nothing to train on$"):
            load_pairs(str(tmp_path / source), 8)
    # a shard without samples: "ArrowInvalid: Must pass at least one table", alone or in a folder of shards
    (tmp_path / "shards").mkdir()
    for shard in (tmp_path / "empty.tar", tmp_path / "shards" / "000.tar"):
        tarfile.open(shard, "w").close()
    for source in ("empty.tar", "shards"):
        with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / source))} holds no samples: nothing to train on$"):
            load_pairs(str(tmp_path / source), 8)
    # a saved datasets folder of zero rows, which datasets' load_from_disk fails on ("list index out of range")
    import datasets

    datasets.Dataset.from_dict({"image": [], "text": []}).save_to_disk(tmp_path / "saved")
    with pytest.raises(InputError, match=f"^{re.escape(str(tmp_path / 'saved'))} holds a saved dataset of zero rows: nothing to train on$"):
        load_pairs(str(tmp_path / "saved"), 8)


def test_a_saved_dataset_dict_of_one_split_is_read_as_the_scan_reads_it(tmp_path):
    # train took a folder save_to_disk wrote for a DatasetDict (dataset_dict.json, a folder per split)
    # for an image folder, and said it had no metadata.jsonl, where the scan read its one split
    import datasets

    images = [Image.new("RGB", (12, 12), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["red", "blue", "green"]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "one")
    got, captions, problems = load_pairs(str(tmp_path / "one"), 8)
    assert captions == [r.caption for r in open_source(tmp_path / "one").rows(0, 10)] == ["red", "blue", "green"]
    assert got[1][0, 0].tolist() == [0.0, 0.0, 1.0] and problems == []
    # several splits: which rows are meant is unclear, and both refuse it in the same words
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "two")
    said = f"{tmp_path / 'two'} holds the splits ['train', 'test']; pick one and save it alone"
    for read in (lambda: load_pairs(str(tmp_path / "two"), 8), lambda: open_source(tmp_path / "two")):
        with pytest.raises(InputError, match=re.escape(said)):
            read()


def test_an_image_folder_with_a_stray_state_json_is_still_an_image_folder(tmp_path):
    # a saved Dataset holds dataset_info.json and state.json; train took either alone for one, and
    # failed on an image folder that held some tool's state.json
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "r.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "imgs" / "metadata.jsonl").write_text(json.dumps({"file_name": "r.png", "text": "a red square"}) + "\n")
    (tmp_path / "imgs" / "state.json").write_text("{}")
    assert load_pairs(str(tmp_path / "imgs"), 8)[1] == ["a red square"]
    assert [r.caption for r in open_source(tmp_path / "imgs").rows(0, 5)] == ["a red square"]


def test_an_empty_shard_beside_others_is_read_as_no_samples(tmp_path, samples_as_shards_and_folder):
    # the scan reads it as no samples; datasets' loader stopped at it ("Must pass at least one table")
    # and trained on none of the other shards' samples
    shards, _ = samples_as_shards_and_folder
    tarfile.open(shards / "000-empty.tar", "w").close()
    assert sorted(shards.glob("*.tar"))[0].name == "000-empty.tar"
    images, captions, problems = load_pairs(str(shards), 8)
    assert captions == [r.caption for r in open_source(shards).rows(0, 10**6) if r.caption_issue is None]
    assert len(images) == len(captions) > 0
    # a file the scan refuses for another reason is not called empty
    (tmp_path / "e.json").write_text("")
    with pytest.raises(InputError, match="e.json is not valid JSON"):
        load_pairs(str(tmp_path / "e.json"), 8)


def test_webdataset_shards_train_on_the_pairs_of_the_same_samples_as_an_image_folder(samples_as_shards_and_folder):
    # img2dataset's .tar shards could be scanned but not trained on; through datasets' webdataset
    # loader their columns are named by extension: the caption is txt, the image png here
    from shards import SHARD_SAMPLES

    shards, folder = samples_as_shards_and_folder
    from_tar, captions, problems = load_pairs(str(shards), 8)
    from_folder, folder_captions, _ = load_pairs(str(folder), 8)
    assert captions == folder_captions == [c for _, c in SHARD_SAMPLES] and problems == []
    np.testing.assert_array_equal(from_tar, from_folder)
    _, one_shard, _ = load_pairs(str(shards / "00001.tar"), 8)
    assert one_shard == [c for _, c in SHARD_SAMPLES[3:]]


@pytest.mark.parametrize("shard_formats", [[["jpg", "png", "jpg", "webp", "png", "jpg"]],
                                           [["jpg"] * 5 + ["png", "webp"]],
                                           [["jpg", "jpg"], ["png", "png"]]],
                         ids=["first-samples-differ", "a-later-format", "a-later-shard"])
def test_shards_that_mix_image_formats_train_on_every_sample_as_the_scan_reads_it(tmp_path, shard_formats):
    # datasets' webdataset loader types its columns by the first shard's first 5 samples: it refused
    # shards whose samples differ there, and read a later .png as "missing image"; the scan took the
    # .jpg alone too, so neither trained on nor vouched for the other formats' samples
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    (tmp_path / "shards").mkdir()
    expected, n = [], 0
    for k, formats in enumerate(shard_formats):
        members = []
        for fmt in formats:
            colour = (10 * n, 255 - 10 * n, 7)
            members.append((f"{n:03d}.{fmt}", _png(colour)))
            # the last sample's caption is in its .json alone, where the others have a .txt
            members.append((f"{n:03d}.json", json.dumps({"caption": f"sample {n}"}).encode()) if fmt == formats[-1] == "webp"
                           else (f"{n:03d}.txt", f"sample {n}".encode()))
            expected.append((f"sample {n}", [c / 255 for c in colour]))
            n += 1
        write_tar_shard(tmp_path / "shards" / f"{k:05d}.tar", members)
    images, captions, problems = load_pairs(str(tmp_path / "shards"), 8)
    assert problems == [] and captions == [c for c, _ in expected]
    np.testing.assert_allclose([im[0, 0] for im in images], [c for _, c in expected], atol=1e-6)
    scanned = WebDatasetSource(tmp_path / "shards").rows(0, n)
    assert [(r.caption, r.image_issue) for r in scanned] == [(c, None) for c, _ in expected]
    np.testing.assert_allclose([r.image[0, 0] for r in scanned], [c for _, c in expected], atol=1e-6)


def test_a_shard_caption_saved_with_a_byte_order_mark_reads_without_it_in_the_scan_and_train(tmp_path):
    # both kept U+FEFF ahead of a Windows editor's .txt: the scan's caption duplicates missed the
    # caption it repeats, and the text encoder read a character the captioner never wrote
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    write_tar_shard(tmp_path / "s.tar", [("a.jpg", _png((255, 0, 0))), ("a.txt", "\ufeffa red square".encode()),
                                         ("b.jpg", _png((0, 255, 0))), ("b.txt", b"a red square"),
                                         ("c.jpg", _png((0, 0, 255))), ("c.txt", "\ufeff".encode())])
    scanned = WebDatasetSource(tmp_path / "s.tar").rows(0, 3)
    assert [(r.caption, r.caption_issue) for r in scanned] == [("a red square", None), ("a red square", None), ("", "empty")]
    _, captions, problems = load_pairs(str(tmp_path / "s.tar"), 8)
    assert captions == ["a red square", "a red square"] and problems == [{"row": 2, "problem": "empty caption"}]


def test_a_shard_of_capital_extensions_trains_on_what_the_scan_reads(tmp_path):
    # a camera writes .JPG: the scan matched it as .jpg, while datasets names the column JPG and train
    # found no image column
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    write_tar_shard(tmp_path / "s.tar", [("a.JPG", _png((255, 0, 0))), ("a.TXT", b"red"),
                                         ("b.JPG", _png((0, 255, 0))), ("b.JSON", json.dumps({"caption": "green"}).encode())])
    scanned = WebDatasetSource(tmp_path / "s.tar").rows(0, 2)
    assert [(r.caption, r.image_issue) for r in scanned] == [("red", None), ("green", None)]
    images, captions, problems = load_pairs(str(tmp_path / "s.tar"), 8)
    assert captions == ["red", "green"] and problems == []
    assert images[:, 0, 0].tolist() == [r.image[0, 0].tolist() for r in scanned] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_a_dataset_saved_from_mixed_shards_is_read_per_sample_by_the_scan_and_train(tmp_path):
    import datasets
    from shards import write_tar_shard

    from diffmem.scan.sources import webdataset_features

    write_tar_shard(tmp_path / "s.tar", [("a.jpg", _png((255, 0, 0))), ("a.txt", b"red"), ("b.png", _png((0, 255, 0))),
                                         ("b.json", json.dumps({"caption": "green", "width": 20}).encode())])
    features = webdataset_features([tmp_path / "s.tar"])
    assert set(features) == {"__key__", "__url__", "jpg", "png", "txt", "json"}
    datasets.load_dataset("webdataset", data_files=[str(tmp_path / "s.tar")], split="train",
                          features=features).save_to_disk(str(tmp_path / "saved"))
    rows = open_source(tmp_path / "saved").rows(0, 2)
    assert [(r.caption, r.image_issue, r.location) for r in rows] == [("red", None, "s.tar:a"), ("green", None, "s.tar:b")]
    assert rows[1].image[0, 0].tolist() == [0.0, 1.0, 0.0]
    images, captions, problems = load_pairs(str(tmp_path / "saved"), 8)
    assert captions == ["red", "green"] and problems == [] and images[1, 0, 0].tolist() == [0.0, 1.0, 0.0]
    # a column named is every sample's: the .png alone
    _, captions, problems = load_pairs(str(tmp_path / "saved"), 8, image_column="png")
    assert captions == ["green"] and problems == [{"row": 0, "problem": "missing image"}]


def test_a_sample_with_two_images_gives_train_and_the_scan_the_same_one(tmp_path):
    # the scan took the first extension alphabetically (bmp, then jpeg) and train jpg first: a curator's
    # scan then vouched for images other than those the model trained on
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    colours = {"bmp": (0, 0, 255), "jpeg": (0, 255, 0), "jpg": (255, 0, 0)}
    write_tar_shard(tmp_path / "s.tar", [m for k in ("a", "b") for m in [(f"{k}.txt", f"sample {k}".encode())]
                                         + [(f"{k}.{ext}", _png(c)) for ext, c in colours.items()]])
    images, captions, problems = load_pairs(str(tmp_path / "s.tar"), 8)
    assert captions == ["sample a", "sample b"] and problems == []
    scanned = WebDatasetSource(tmp_path / "s.tar").rows(0, 2)
    for trained, row in zip(images, scanned):
        assert trained[0, 0].tolist() == [1.0, 0.0, 0.0]  # the .jpg, as img2dataset writes it
        assert row.image[0, 0].tolist() == [1.0, 0.0, 0.0]


def test_shard_captions_in_json_alone_train_as_the_scan_reads_them(tmp_path):
    # img2dataset writes the caption into key.json, and key.txt only when asked: train said "no caption
    # column" for shards the scan read; datasets fills a key a sample lacks with None (b has no "caption")
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    metas = {"a": {"caption": "a red square", "width": 20}, "b": {"text": "a green square"},
             "c": {"caption": None, "status": "failed"}, "d": {"caption": "a blue square", "text": "ignored"}}
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (9, 9, 9), "d": (0, 0, 255)}
    write_tar_shard(tmp_path / "s.tar", [m for k, meta in metas.items()
                                         for m in [(f"{k}.jpg", _png(colours[k])), (f"{k}.json", json.dumps(meta).encode())]])
    images, captions, problems = load_pairs(str(tmp_path / "s.tar"), 8)
    scanned = [r.caption for r in WebDatasetSource(tmp_path / "s.tar").rows(0, 4)]
    assert scanned == ["a red square", "a green square", None, "a blue square"]
    assert captions == [c for c in scanned if c is not None]
    assert problems == [{"row": 2, "problem": "empty caption"}]
    assert [im[0, 0].tolist() for im in images] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_a_sample_with_a_caption_file_beside_its_txt_trains_on_the_txt_the_scan_reads(tmp_path):
    # train tried caption / text / prompt before txt on shards too: a sample's .caption file, which
    # datasets hands over as bytes, came first, and every row was refused as "caption not text (bytes)"
    # while the scan read the .txt; named, the .caption file is read as UTF-8 text, as the scan reads it
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    write_tar_shard(tmp_path / "s.tar", [m for i, c in enumerate(((255, 0, 0), (0, 255, 0))) for m in [
        (f"{i:03d}.png", _png(c)), (f"{i:03d}.txt", f"the txt {i}".encode()), (f"{i:03d}.caption", f"the other {i}".encode())]])
    images, captions, problems = load_pairs(str(tmp_path / "s.tar"), 8)
    assert captions == [r.caption for r in WebDatasetSource(tmp_path / "s.tar").rows(0, 2)] == ["the txt 0", "the txt 1"]
    assert problems == [] and images[1, 0, 0].tolist() == [0.0, 1.0, 0.0]
    _, named, _ = load_pairs(str(tmp_path / "s.tar"), 8, caption_column="caption")
    scanned = WebDatasetSource(tmp_path / "s.tar", caption_column="caption").rows(0, 2)
    assert named == [r.caption for r in scanned] == ["the other 0", "the other 1"]
    write_tar_shard(tmp_path / "bad.tar", [("0.png", _png((1, 2, 3))), ("0.caption", b"caf\xe9"),
                                           ("1.png", _png((4, 5, 6))), ("1.caption", b"fine")])
    _, named, problems = load_pairs(str(tmp_path / "bad.tar"), 8, caption_column="caption")
    assert named == ["fine"] and problems == [{"row": 0, "problem": "caption not UTF-8"}]


def test_a_saved_dataset_made_from_shards_is_read_by_the_shards_rules_in_scan_and_train(tmp_path):
    # saved with save_to_disk (or a hub dataset of shards), its columns are the extensions again: the scan
    # found no image column (png is no table's name) and read the .caption file, train refused every row
    import datasets
    from shards import write_tar_shard

    from diffmem.scan.sources import open_source

    meta = {"a": {"caption": "a red square"}, "b": {"text": "a green square"}}
    write_tar_shard(tmp_path / "s.tar", [m for k, c in (("a", (255, 0, 0)), ("b", (0, 255, 0))) for m in [
        (f"{k}.png", _png(c)), (f"{k}.json", json.dumps(meta[k]).encode()), (f"{k}.caption", b"other")]])
    datasets.load_dataset("webdataset", data_files=[str(tmp_path / "s.tar")], split="train").save_to_disk(tmp_path / "saved")
    images, captions, problems = load_pairs(str(tmp_path / "saved"), 8)
    source = open_source(tmp_path / "saved")
    scanned = source.rows(0, 2)
    assert captions == [r.caption for r in scanned] == ["a red square", "a green square"] and problems == []
    assert [r.location for r in scanned] == ["s.tar:a", "s.tar:b"]  # as the shards' own scan places them
    for trained, row in zip(images, scanned):
        assert trained[0, 0].tolist() == row.image[0, 0].tolist()
    assert images[1, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_a_table_trains_on_the_columns_the_scan_reads(tmp_path):
    # train took "text" before "caption" and knew no "file_name" column outside an image folder, so
    # a table the scan read trained on other captions, or not at all ("no image column 'image'")
    from diffmem.scan.sources import TableSource

    (tmp_path / "r.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "g.png").write_bytes(_png((0, 255, 0)))
    pd.DataFrame({"file_name": ["r.png", "g.png"], "text": ["short", "short"],
                  "caption": ["a red square", "a green square"]}).to_csv(tmp_path / "d.csv", index=False)
    images, captions, problems = load_pairs(str(tmp_path / "d.csv"), 8)
    scanned = TableSource(tmp_path / "d.csv").rows(0, 2)
    assert captions == [r.caption for r in scanned] == ["a red square", "a green square"] and problems == []
    for trained, row in zip(images, scanned):
        assert trained[0, 0].tolist() == row.image[0, 0].tolist()
    assert images[1, 0, 0].tolist() == [0.0, 1.0, 0.0]


def test_a_shard_json_that_is_not_json_is_named_not_left_to_datasets_words(tmp_path):
    # datasets' loader stops at it with "An error occurred while generating the dataset"; sample 020 lies
    # past the samples it reads to infer the columns, 021 is not UTF-8
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    members = []
    for i in range(24):
        meta = {20: b'{"caption": "cut', 21: b'{"caption": "\xff"}'}.get(i, json.dumps({"caption": f"c{i}"}).encode())
        members += [(f"{i:03d}.jpg", _png((i, i, i), 8)), (f"{i:03d}.json", meta)]
    write_tar_shard(tmp_path / "s.tar", members)
    with pytest.raises(InputError, match=r"webdataset loader, which cannot read 2 sample file\(s\) in .*s.tar, the "
                                         r"first s.tar:020.json \(Unterminated string.*\); .* mend or remove them"):
        load_pairs(str(tmp_path / "s.tar"), 8)
    rows = WebDatasetSource(tmp_path / "s.tar").rows(19, 22)  # what the message says of the scan
    assert [(r.caption, r.caption_issue) for r in rows] == [("c19", None), (None, "missing"), (None, "missing")]


def test_a_compressed_shard_is_refused_as_the_scan_refuses_it(tmp_path):
    import tarfile

    (tmp_path / "a.txt").write_text("x")
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a.txt", arcname="a.txt")
    with pytest.raises(InputError, match=r"s.tar.gz is a compressed tar: decompress it to .tar"):
        load_pairs(str(tmp_path / "s.tar.gz"), 8)


def test_tsv_and_json_list_tables_train_as_the_csv_and_jsonl_do(tmp_path):
    (tmp_path / "r.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "g.png").write_bytes(_png((0, 255, 0)))
    rows = [{"image": "r.png", "text": "red, bright"}, {"image": "g.png", "text": "green"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    expected = load_pairs(str(tmp_path / "d.csv"), 8)
    for name in ("d.tsv", "d.json"):
        images, captions, problems = load_pairs(str(tmp_path / name), 8)
        assert captions == expected[1] == ["red, bright", "green"] and problems == []
        np.testing.assert_array_equal(images, expected[0])


# half an emoji, escaped as a truncated scraped caption holds it: the scan reads the row with U+FFFD
# and flags its caption, but no Arrow column takes it
_HALF_EMOJI = b"a cat \\ud83d"
# the caption datasets cannot read, as the file holds it; train's refusal; the caption the scan reads
_UNREADABLE_CAPTIONS = {
    "not UTF-8": (b"caf\xe9 au lait", r"row 1 is not UTF-8 .*; 1 of its 3 rows is not UTF-8", "caf\ufffd au lait"),
    "lone surrogate": (_HALF_EMOJI, r"row 1 \('text'\) holds a lone surrogate.*; 1 of its 3 rows is not UTF-8 or holds a "
                                    r"lone surrogate", "a cat \ufffd")}


@pytest.mark.parametrize("layout, kind", [(layout, "not UTF-8") for layout in ("metadata.jsonl", "d.jsonl", "metadata.csv",
                                                                              "d.csv", "d.tsv")]
                         + [(layout, "lone surrogate") for layout in ("metadata.jsonl", "d.jsonl", "d.json")])
def test_a_caption_datasets_cannot_read_is_refused_by_row_as_the_scan_flags_it(tmp_path, layout, kind):
    # datasets refused the whole file, naming neither the row nor the cause ("ArrowInvalid: JSON parse
    # error: The surrogate pair in string is invalid", "An error occurred while generating the dataset"
    # of a .csv, "'utf-8' codec can't decode byte 0xe9" of a metadata.csv), or took a .jsonl with such a
    # byte in whole and failed with a traceback when it reached the row. A JSON list, which datasets
    # reads whole with pandas' ujson, it took with the half character dropped without a word.
    from diffmem.scan.sources import open_source

    held, refusal, scanned_caption = _UNREADABLE_CAPTIONS[kind]
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))):
        (tmp_path / name).write_bytes(_png(colour))
    column = "file_name" if layout.startswith("metadata") else "image"
    rows = ((b"a.png", b"fine"), (b"b.png", held), (b"c.png", b"also fine"))
    if layout.endswith((".jsonl", ".json")):
        lines = [b'{"%s": "%s", "text": "%s"}' % (column.encode(), name, caption) for name, caption in rows]
        if layout.endswith(".json"):  # a JSON list
            lines = [b"[" + b",\n".join(lines) + b"]"]
    else:
        sep = b"\t" if layout.endswith(".tsv") else b","
        lines = [column.encode() + sep + b"text"] + [name + sep + caption for name, caption in rows]
    (tmp_path / layout).write_bytes(b"\n".join(lines) + b"\n")
    source = tmp_path if layout.startswith("metadata") else tmp_path / layout
    with pytest.raises(InputError, match=rf"{layout} {refusal}.* mend or remove"):
        load_pairs(str(source), 8)
    scanned = open_source(source).rows(0, 3)
    assert [(r.caption, r.caption_issue) for r in scanned] == [("fine", None), (scanned_caption, kind), ("also fine", None)]


def test_a_shard_file_datasets_cannot_decode_is_named_as_a_json_that_is_not_json_is(tmp_path):
    # train said only "UnicodeEncodeError: 'utf-8' codec can't encode character '\ud83d' in position 6"
    from shards import write_tar_shard

    from diffmem.scan.sources import WebDatasetSource

    write_tar_shard(tmp_path / "s.tar", [("0.png", _png((1, 2, 3))), ("0.json", b'{"caption": "fine"}'),
                                         ("1.png", _png((4, 5, 6))), ("1.json", b'{"caption": "%s"}' % _HALF_EMOJI),
                                         ("2.png", _png((7, 8, 9))), ("2.txt", b"caf\xe9")])
    with pytest.raises(InputError, match=r"webdataset loader, which cannot read 2 sample file\(s\) in .*s.tar, the "
                                         r"first s.tar:1.json \(holds a lone surrogate \\ud83d at character 6"):
        load_pairs(str(tmp_path / "s.tar"), 8)
    rows = WebDatasetSource(tmp_path / "s.tar", caption_column="json").rows(0, 2)
    assert [(r.caption, r.caption_issue) for r in rows] == [("fine", None), ("a cat \ufffd", "lone surrogate")]
    write_tar_shard(tmp_path / "t.tar", [("0.png", _png((1, 2, 3))), ("0.txt", b"fine"), ("1.png", _png((7, 8, 9))),
                                         ("1.txt", b"caf\xe9"), ("2.png", _png((4, 5, 6))), ("2.cls", b"seven")])
    with pytest.raises(InputError, match=r"cannot read 2 sample file\(s\) in .*t.tar, the first t.tar:1.txt \(not UTF-8: "
                                         r"byte 0xe9 at 3\); the scan reads a .txt that is not UTF-8"):
        load_pairs(str(tmp_path / "t.tar"), 8)
    rows = WebDatasetSource(tmp_path / "t.tar").rows(0, 2)
    assert [(r.caption, r.caption_issue) for r in rows] == [("fine", None), ("caf\ufffd", "not UTF-8")]


def test_an_unreadable_image_is_named_in_the_same_words_by_train_and_the_scan(tmp_path):
    # the scan cut its words at 120 characters, mid-path in a deep folder, where train kept 300
    from diffmem.scan.sources import open_source

    deep = tmp_path / ("a folder with a long name, " * 4).strip(", ")
    deep.mkdir()
    (deep / "a.png").write_bytes(_png((255, 0, 0)))
    (deep / "d.jsonl").write_text("\n".join(json.dumps({"image": n, "text": "x"}) for n in ("a.png", "gone.png")))
    _, _, problems = load_pairs(str(deep / "d.jsonl"), 8)
    scanned = open_source(deep / "d.jsonl").rows(1, 2)[0]
    assert f"in neither the table's folder {deep} nor" in problems[0]["detail"] and len(problems[0]["detail"]) > 120
    assert scanned.image_issue == f"{problems[0]['problem']}: {problems[0]['detail']}"


def test_an_image_path_in_a_saved_dataset_is_read_where_the_scan_reads_it(tmp_path, monkeypatch):
    # train looked for a relative path in the saved folder before the working directory, where the scan
    # (and datasets) look only in the working directory: it trained on an image the scan called missing
    import datasets

    monkeypatch.chdir(tmp_path)
    datasets.Dataset.from_dict({"image": ["imgs/0.png", "imgs/1.png"], "text": ["red", "blue"]}).save_to_disk("saved")
    (tmp_path / "saved" / "imgs").mkdir()
    (tmp_path / "saved" / "imgs" / "0.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "1.png").write_bytes(_png((0, 0, 255)))
    got, captions, problems = load_pairs("saved", 8)
    scanned = open_source(tmp_path / "saved").rows(0, 2)
    assert captions == ["blue"] and got[0][0, 0].tolist() == [0.0, 0.0, 1.0] and scanned[1].image_issue is None
    assert [p["row"] for p in problems] == [0] and "No such file or directory: 'imgs/0.png'" in problems[0]["detail"]
    assert scanned[0].image_issue == f"{problems[0]['problem']}: {problems[0]['detail']}"


def test_a_table_the_scan_cannot_read_either_keeps_datasets_words(tmp_path, monkeypatch):
    # the check by row reads the table with the scan's reader only when datasets failed; its own failure
    # of any kind must leave datasets' words, not raise a second, unrelated error
    import datasets

    import diffmem.train.data as data

    def broken(*a, **k):
        raise RuntimeError("the scan's reader broke")

    def refused(*a, **k):
        raise ValueError("datasets' own words")

    (tmp_path / "d.csv").write_text("image,text\na.png,x\n")
    monkeypatch.setattr(data, "TableSource", broken)
    monkeypatch.setattr(datasets, "load_dataset", refused)
    with pytest.raises(InputError, match=r"could not read training data .*d.csv': ValueError: datasets' own words$"):
        load_pairs(str(tmp_path / "d.csv"), 8)


def test_datasets_generation_error_gives_its_cause_not_its_own_words(tmp_path):
    # "An error occurred while generating the dataset" was all train said of a .csv with a field too many,
    # which the scan reads (the extra field apart)
    rows = [f"{i}.png,caption {i}" for i in range(6)]
    rows[3] = "3.png,caption 3,a field too many"
    (tmp_path / "t.csv").write_text("image,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"could not read training data .*t.csv': ParserError: .*Expected 2 fields in line 5"):
        load_pairs(str(tmp_path / "t.csv"), 8)


@pytest.mark.parametrize("name, content", [
    ("comma.json", b'[{"image": "a.png", "text": "a"},\n{"image": "a.png" "text": "b"}]'),
    ("cut.json", b'[{"image": "a.png", "text": "a"},\n{"image": "a.png", "text": "b"}'),
    ("latin1.json", b'[{"image": "a.png", "text": "caf\xe9"}]'),
    ("comma.jsonl", b'{"image": "a.png", "text": "a"}\n{"image": "a.png" "text": "b"}\n'),
    ("open.csv", b'image,text\na.png,a\na.png,"a quote left open\na.png,c\n')])
def test_a_table_the_scan_refuses_too_is_refused_in_the_scans_words(tmp_path, name, content):
    # datasets' words named a character offset ("Unexpected character found when decoding object value at
    # position 47") or a row counted from 0 ("in row 1"); the scan's name the line
    from diffmem.scan.sources import TableSource

    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError) as scanned:
        TableSource(tmp_path / name)
    assert re.search(r"line [23]\b|byte \d+", str(scanned.value))
    with pytest.raises(InputError) as trained:
        load_pairs(str(tmp_path / name), 8)
    assert str(trained.value) == f"could not read training data {str(tmp_path / name)!r}: {scanned.value}"
