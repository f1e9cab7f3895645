"""Captioned datasets as a stream of rows, read in shards so memory is bounded by the shard size.

Every source yields ``ScanRow`` objects in a fixed order, so that shard ``k`` is always the same
rows: this is what lets an interrupted scan resume exactly where it stopped.

Sources:

- ``MemLabSource``: the MemLab training set (pixels only; its manifest is never read by the scan).
- ``ImageFolderSource``: a folder of images with captions in ``metadata.jsonl`` / ``metadata.csv``
  (the Hugging Face imagefolder layout: ``file_name`` plus a caption column) or in ``.txt`` files
  beside the images.
- ``TableSource``: ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` rows with a caption column and, optionally,
  an image column (a path, or encoded bytes) or an image key (a URL or hash that identifies the
  image, for text-only scans).
- ``HFDatasetSource``: a ``datasets.Dataset`` object or a folder saved with ``save_to_disk``.
- ``WebDatasetSource``: WebDataset ``.tar`` shards (img2dataset's ``webdataset`` output), a shard
  or a folder of them, read in place.

Problems inside a row (an unreadable image, a missing or non-UTF-8 caption) are recorded on the
row and never stop the stream; problems with the dataset itself (no such file, zero rows, no
caption column) raise ``InputError``.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core.errors import InputError, first_line, kind_and_first_line
from ..core.prompts import lone_surrogate, read_csv, replace_lone_surrogates
from ..core.images import empty_cell, image_array, image_cell

CAPTION_COLUMNS = ("caption", "text", "prompt")
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path")
KEY_COLUMNS = ("image_key", "url", "image_url", "sha256", "key")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # shards that cannot be read by offset
# a shard sample's image, by extension, most wanted first (img2dataset writes jpg): the scan and
# `diffmem train` take the same one from a sample that holds two
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
# a shard sample's caption: its .txt, else its .json's caption / text / prompt (``json_caption``)
SHARD_CAPTION_EXTENSIONS = ("txt", "json")


class ZeroRowsError(InputError):
    """A dataset with no rows: nothing to scan. Its own kind, so that ``diffmem train``, which asks the
    scan's reader why datasets could not read a dataset, tells an empty one from a broken one; ``empty``
    says what is empty ("X has zero rows"), without what the scan would have done with it."""

    def __init__(self, empty: str):
        super().__init__(f"{empty}: nothing to scan")
        self.empty = empty

    def for_job(self, what: str) -> InputError:
        """The refusal in the words of the job that read the data ("X has zero rows: nothing to train on")."""
        return InputError(f"{self.empty}: {what}")


@dataclass
class ScanRow:
    row: int
    caption: str | None
    caption_issue: str | None = None  # "missing", "empty", "not UTF-8", "lone surrogate", "not text (int)", "unreadable"
    image: np.ndarray | None = None  # float32 (H, W, 3) in [0, 1]
    image_issue: str | None = None  # why the image could not be read
    image_key: str | None = None  # identity of the image when only a key is available
    # where the curator finds the row's image: its path as the data names it, or shard.tar:key
    location: str | None = None
    phash: int | None = None  # set with ``thumb`` when the image was reduced as it was read (``Source.reduced_rows``)
    thumb: bytes | None = None


def load_image(data) -> np.ndarray:
    """A path, bytes, PIL image or array as float32 RGB in [0, 1], upright by its EXIF orientation.
    Raises on unreadable input."""
    return image_array(data)


def caption_and_issue(value) -> tuple[str | None, str | None]:
    """A caption cell read as a caption, and what is wrong with it (``ScanRow.caption_issue``) or None;
    ``diffmem train`` skips the rows the scan flags by the same rules."""
    if empty_cell(value):
        return None, "missing"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("utf-8", errors="replace"), "not UTF-8"
    if not isinstance(value, str):  # a number or a list: most likely the wrong column, never a caption
        return str(value), f"not text ({type(value).__name__})"
    # the byte-order mark a Windows editor writes ahead of a .txt: no part of the caption, and with it
    # "a cat" and "\ufeffa cat" would be two captions (datasets decodes a shard's .txt keeping it)
    value = value.removeprefix("\ufeff")
    if not value.strip():
        return value, "empty"
    if lone_surrogate(value):  # half an emoji from truncated JSON: no tokenizer or Parquet file takes it
        return replace_lone_surrogates(value), "lone surrogate"
    return value, None


class Source:
    """A dataset read in order; ``describe()`` identifies it for resume checks."""

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> list[ScanRow]:
        raise NotImplementedError

    # the sources here reduce each image as soon as it is decoded (``rows``' ``reduce``); a source
    # of the caller's own gives its rows whole, and they are reduced after
    reduces_as_it_reads = False

    def reduced_rows(self, start: int, stop: int, reduce) -> list[ScanRow]:
        """``rows`` with each image passed through ``reduce(image) -> (phash, thumb, kept)`` as soon as
        it is decoded, the row keeping ``kept`` as its image (phash and thumb may be None: a replication
        measure keeps only its model's input): a shard of full-size photos was held whole, 144 MB of
        float32 pixels for each 12-megapixel one. An image ``reduce`` fails on is unreadable, as one
        its decoder fails on."""
        if self.reduces_as_it_reads:
            return self.rows(start, stop, reduce=reduce)
        rows = self.rows(start, stop)
        for row in rows:
            _reduce(row, reduce)
        return rows

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def has_images(self) -> bool:
        return True


class MemLabSource(Source):
    def __init__(self, config=None):
        from ..memlab import dataset as ds

        self.dataset = ds.build(config)

    def __len__(self) -> int:
        return len(self.dataset.rows)

    reduces_as_it_reads = True

    def rows(self, start, stop, reduce=None):
        out = []
        for i in range(start, min(stop, len(self))):
            r = self.dataset.rows[i]
            row = ScanRow(i, r.caption, image=self.dataset.image(r.image_id))
            _reduce(row, reduce)
            out.append(row)
        return out

    def describe(self):
        return {"kind": "memlab", "config": self.dataset.config.to_dict()}


class ListSource(Source):
    """In-memory rows (tests, the synthetic benchmark, Python callers)."""

    def __init__(self, captions, images=None, image_keys=None, name: str = "list"):
        self.captions = list(captions)
        self.images = images
        self.image_keys = image_keys
        self.name = name
        if not self.captions:
            raise ZeroRowsError("the dataset has zero rows")

    def __len__(self):
        return len(self.captions)

    @property
    def has_images(self):
        return self.images is not None

    reduces_as_it_reads = True

    def rows(self, start, stop, reduce=None):
        out = []
        for i in range(start, min(stop, len(self))):
            cap, issue = caption_and_issue(self.captions[i])
            row = ScanRow(i, cap, issue, image_key=None if self.image_keys is None else str(self.image_keys[i]))
            if self.images is not None:
                _fill_image(row, lambda: self.images[i], reduce)
            out.append(row)
        return out

    def describe(self):
        h = hashlib.sha256("\n".join(map(str, self.captions)).encode("utf-8", "replace")).hexdigest()[:16]
        return {"kind": "list", "name": self.name, "rows": len(self), "captions_sha256": h}


def _cell_location(value) -> str | None:
    """An image cell's file path as the table writes it (plain, or in ``datasets``' Image struct); None
    for encoded bytes, which name no file."""
    if isinstance(value, dict):
        value = value.get("path")
    return value if isinstance(value, str) and value.strip() else None


def _fill_image(row: ScanRow, get, reduce=None) -> None:
    try:
        value = get()
        if empty_cell(value):
            row.image_issue = "missing image"
            return
        row.image = load_image(value)
    except Exception as e:  # any decoder error is a property of this row, not of the scan
        _unreadable(row, e)
        return
    _reduce(row, reduce)


def _unreadable(row: ScanRow, error: Exception) -> None:
    row.image = None
    row.image_issue = f"unreadable image: {kind_and_first_line(error)}"  # the words train gives


def _reduce(row: ScanRow, reduce) -> None:
    """The row's image through ``reduce`` (see ``Source.reduced_rows``), if it has one and a reduce is given."""
    if reduce is None or row.image is None:
        return
    try:
        row.phash, row.thumb, row.image = reduce(row.image)
    except Exception as e:
        _unreadable(row, e)


class ImageFolderSource(Source):
    def __init__(self, folder: str | Path, caption_column: str | None = None, captions: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"dataset folder not found: {self.folder}")
        meta = folder_metadata(self.folder)
        if meta is not None:
            table = TableSource(meta, caption_column=caption_column, image_column="file_name", captions=captions,
                                working_directory=False)  # as datasets' imagefolder: its own files alone
            self._table = table
        else:
            self._table = None
            files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"{self.folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no metadata.jsonl / metadata.csv")
            self.files = files

    def __len__(self):
        return len(self._table) if self._table is not None else len(self.files)

    reduces_as_it_reads = True

    def rows(self, start, stop, reduce=None):
        if self._table is not None:
            return self._table.rows(start, stop, reduce)
        out = []
        for i in range(start, min(stop, len(self))):
            p = self.files[i]
            txt = p.with_suffix(".txt")
            cap, issue = caption_and_issue(txt.read_bytes() if txt.exists() else None)
            row = ScanRow(i, cap.strip() if cap else cap, issue, location=p.relative_to(self.folder).as_posix())
            _fill_image(row, lambda: p, reduce)
            out.append(row)
        return out

    def describe(self):
        if self._table is not None:
            return {"kind": "imagefolder", **self._table.describe()}
        return {"kind": "imagefolder", "folder": str(self.folder.resolve()), "rows": len(self)}


def _mended(rec: dict, not_utf8: bool) -> dict:
    """A JSON row with its flags: not UTF-8, and which of its strings held a lone surrogate."""
    rec["__not_utf8__"] = not_utf8
    # half an emoji escaped in a truncated line ("\\ud83d"): no Arrow-backed column takes it,
    # so it is replaced here, and the row's caption flagged if it was there
    mended = [k for k, v in rec.items() if isinstance(v, str) and lone_surrogate(v)]
    for k in mended:
        rec[k] = replace_lone_surrogates(rec[k])
    rec["__lone_surrogate__"] = mended or None  # None, not an empty list on every row
    return rec


class TableSource(Source):
    """Rows of a ``.parquet``, ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file."""

    def __init__(self, path: str | Path, caption_column: str | None = None, image_column: str | None = None,
                 key_column: str | None = None, captions: bool = True, working_directory: bool = True):
        self.path = Path(path)
        self.working_directory = working_directory  # also where a relative image path is looked for (core.images.image_cell)
        if not self.path.exists():
            raise InputError(f"dataset file not found: {self.path}")
        suffix = self.path.suffix.lower()
        self.frame = self._parquet = None
        if suffix == ".parquet":
            # read a row group at a time: a Parquet file of image bytes read whole took about four times its
            # size in memory (3.2 GB for 804 MB), so a curator's multi-GB file could not be scanned at all
            self._parquet = _ParquetRows(self.path)
            columns = self._parquet.columns
        elif suffix == ".jsonl":
            self.frame = self._read_jsonl()
        elif suffix == ".json":
            self.frame = self._read_json()
        elif suffix in (".csv", ".tsv"):
            self.frame = self._read_csv(delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise InputError(f"unsupported dataset file {self.path.name}: use .parquet, .jsonl, .json, .csv, .tsv, "
                             "WebDataset .tar shards, an image folder or a saved datasets folder")
        if self.frame is not None:
            columns = self.frame.columns
        if len(self) == 0:
            raise ZeroRowsError(f"{self.path} has zero rows")
        self.caption_column = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", self.path, required=captions)
        self.image_column = pick_column(columns, image_column, IMAGE_COLUMNS, "image", self.path, required=False)
        self.key_column = pick_column(columns, key_column, KEY_COLUMNS, "image key", self.path, required=False)

    def _read_jsonl(self):
        import pandas as pd

        records = []
        with open(self.path, "rb") as f:
            for i, raw in enumerate(f, 1):
                if i == 1:  # a byte order mark, which Windows' Notepad writes; datasets reads past it too
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                    bad = False
                except UnicodeDecodeError:
                    text, bad = raw.decode("utf-8", errors="replace"), True
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InputError(f"{self.path} line {i} is not valid JSON: {e.msg}") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{self.path} line {i} is not a JSON object")
                records.append(_mended(rec, bad))
        return pd.DataFrame.from_records(records)

    def _read_json(self):
        """A JSON list of row objects, or JSON Lines under a .json name (as ``datasets``' json loader reads both)."""
        import pandas as pd

        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:  # rows cannot be told apart before parsing, so none can be flagged alone
            raise InputError(f"{self.path} is not UTF-8 (byte {e.start}), as a JSON file must be; as .jsonl its "
                             "rows would be read one by one and the bad ones named") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one object, then another: JSON Lines
                return self._read_jsonl()
            raise InputError(f"{self.path} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if isinstance(data, dict):  # JSON Lines of one row
            return self._read_jsonl()
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{self.path} is JSON, but not a list of objects, one a row")
        return pd.DataFrame.from_records([_mended(r, False) for r in data])

    def _read_csv(self, delimiter: str = ","):
        import pandas as pd

        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        bad = []
        text_lines = []
        for line in lines:
            try:
                text_lines.append(line.decode("utf-8-sig"))
                bad.append(False)
            except UnicodeDecodeError:
                text_lines.append(line.decode("utf-8", errors="replace"))
                bad.append(True)
        _, rows = read_csv("\n".join(text_lines), self.path, delimiter)
        frame = pd.DataFrame([row for _, _, row in rows])
        if len(frame):  # a row is flagged if any line it spans was not UTF-8
            frame["__not_utf8__"] = [any(bad[first - 1 : last]) for first, last, _ in rows]
        return frame

    def __len__(self):
        return len(self._parquet) if self._parquet is not None else len(self.frame)

    @property
    def has_images(self):
        return self.image_column is not None

    reduces_as_it_reads = True

    def _records(self, start, stop):
        if self._parquet is not None:
            wanted = [c for c in (self.caption_column, self.image_column, self.key_column) if c is not None]
            return self._parquet.records(start, stop, list(dict.fromkeys(wanted)))
        return (rec for _, rec in self.frame.iloc[start:stop].iterrows())

    def rows(self, start, stop, reduce=None):
        out = []
        for i, rec in enumerate(self._records(start, stop), start):
            cap, issue = caption_and_issue(rec[self.caption_column] if self.caption_column is not None else None)
            if issue is None and bool(rec.get("__not_utf8__", False)):
                issue = "not UTF-8"
            mended = rec.get("__lone_surrogate__")
            if issue is None and isinstance(mended, list) and self.caption_column in mended:
                issue = "lone surrogate"
            row = ScanRow(i, cap, issue, image_key=None if self.key_column is None else str(rec[self.key_column]))
            if self.image_column is not None:
                row.location = _cell_location(rec[self.image_column])
                _fill_image(row, lambda: image_cell(rec[self.image_column], self.path.parent, self.working_directory),
                            reduce)
            out.append(row)
        return out

    def describe(self):
        st = self.path.stat()
        return {"kind": "table", "path": str(self.path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime),
                "caption_column": self.caption_column, "image_column": self.image_column}


class _ParquetRows:
    """A Parquet file's rows, read a row group at a time, in small batches, and only in the columns asked
    for. A row group's column is the least a Parquet reader takes (its image column is often a single
    page), so memory is bounded by the largest row group, not the file: ``datasets`` writes image
    datasets 100 rows to a group."""

    BATCH_ROWS = 32  # Arrow's reader holds a batch's decoded values beside the group's pages
    LARGE_GROUP_BYTES = 2**30  # a group read whole takes about three times this (2.6 GB for 763 MB)

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self.file = pq.ParquetFile(path, pre_buffer=False)
        except Exception as e:  # pyarrow's ArrowInvalid / OSError: not a Parquet file, or cut short
            raise InputError(f"could not read {path} as Parquet: {e}") from None
        meta = self.file.metadata
        self.columns = self.file.schema_arrow.names
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        sizes = [sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
                 for g in range(meta.num_row_groups)]
        if sizes and max(sizes) > self.LARGE_GROUP_BYTES:  # pandas' to_parquet writes up to a million rows to one
            g = int(np.argmax(sizes))
            import warnings

            warnings.warn(f"{path} keeps rows {self.group_starts[g]}-{self.group_starts[g + 1] - 1} in one row group of "
                          f"{sizes[g] / 2**20:,.0f} MB, which is read whole, at several times that in memory; written in "
                          "groups of 100 rows (pyarrow.parquet.write_table(table, path, row_group_size=100)) it is read "
                          "100 rows at a time", stacklevel=2)

    def __len__(self):
        return int(self.group_starts[-1])

    def records(self, start: int, stop: int, columns: list[str]) -> Iterator[dict]:
        """The rows ``start:stop`` as dicts of Python values (``None`` for an empty cell)."""
        stop = min(stop, len(self))
        first = max(int(np.searchsorted(self.group_starts, start, side="right")) - 1, 0)
        for g in range(first, len(self.group_starts) - 1):
            at, g_stop = int(self.group_starts[g]), int(self.group_starts[g + 1])
            if at >= stop:
                return
            batches = self.file.iter_batches(batch_size=self.BATCH_ROWS, row_groups=[g], columns=columns)
            while at < min(stop, g_stop):
                try:
                    batch = next(batches)
                except Exception as e:  # a damaged page: the shards before it are already scanned and saved
                    raise InputError(f"could not read rows {int(self.group_starts[g])}-{g_stop - 1} of {self.path} "
                                     f"(row group {g}): {e}") from None
                cells = [batch.column(c) for c in columns]
                for k in range(max(start - at, 0), min(stop - at, batch.num_rows)):
                    # one row at a time: its image bytes become a Python object only while it is decoded
                    yield {c: cell[k].as_py() for c, cell in zip(columns, cells)}
                at += batch.num_rows


class HFDatasetSource(Source):
    def __init__(self, dataset, caption_column: str | None = None, image_column: str | None = None, captions: bool = True):
        dataset = load_saved_dataset(dataset) if isinstance(dataset, (str, Path)) else _one_split(dataset)
        if len(dataset) == 0:
            raise ZeroRowsError("the dataset has zero rows")
        self.ds = dataset
        self.caption_tried, self.image_tried = caption_and_image_columns(
            dataset.column_names, caption_column, image_column, "the dataset", captions=captions, images=False)
        self.caption_column = self.caption_tried[0] if self.caption_tried else None
        self.image_column = self.image_tried[0] if self.image_tried else None
        self.key_column = pick_column(dataset.column_names, None, KEY_COLUMNS, "image key", "the dataset", required=False)

    def __len__(self):
        return len(self.ds)

    @property
    def has_images(self):
        return self.image_column is not None

    reduces_as_it_reads = True

    def rows(self, start, stop, reduce=None):
        part = undecoded_images(self.ds.select(range(start, min(stop, len(self)))), self.image_tried)
        out = []
        for i, rec in enumerate(part, start):
            caption_column = first_held(self.caption_tried, lambda c: rec[c] is not None)
            image_column = first_held(self.image_tried, lambda c: rec[c] is not None)
            cap, issue = caption_and_issue(column_caption(rec[caption_column], caption_column)
                                           if caption_column is not None else None)
            row = ScanRow(i, cap, issue, image_key=None if self.key_column is None else str(rec[self.key_column]))
            if self.image_column is not None:
                # a sample of shards: shard.tar:key, as WebDatasetSource places the shards' own samples
                row.location = (f"{Path(rec['__url__']).name}:{rec['__key__']}" if rec.get("__url__") and rec.get("__key__")
                                else _cell_location(rec[image_column]))
                _fill_image(row, lambda: image_cell(rec[image_column]), reduce)
            out.append(row)
        return out

    def describe(self):
        fp = getattr(self.ds, "_fingerprint", None)
        return {"kind": "datasets", "fingerprint": fp, "rows": len(self), "caption_column": self.caption_column}


def is_saved_dataset(folder: Path) -> bool:
    """Whether a folder is one ``datasets``' ``save_to_disk`` wrote: a Dataset's (dataset_info.json and
    state.json, both: an image folder may hold a stray file of either name) or a DatasetDict's
    (dataset_dict.json)."""
    return ((folder / "dataset_info.json").exists() and (folder / "state.json").exists()) or \
        (folder / "dataset_dict.json").exists()


def load_saved_dataset(folder: str | Path):
    """The Dataset a saved datasets folder holds, as the scan and ``diffmem train`` read it: a
    DatasetDict's one split, and one of several splits refused, as the rows it means are unclear."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as e:
        if _saved_without_rows(Path(folder)):  # datasets fails on it with "list index out of range"
            raise ZeroRowsError(f"{folder} holds a saved dataset of zero rows") from None
        raise InputError(f"could not open {folder} as a saved datasets folder: {kind_and_first_line(e)}") from None
    return _one_split(dataset, str(folder))


def _one_split(dataset, folder: str | None = None):
    """``dataset`` itself, or the one split of a DatasetDict; one of several splits is refused, in words
    for the saved ``folder`` it was read from, else for the object a caller passed."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            if folder is None:
                split = next(iter(dataset))
                raise InputError(f"the dataset is a DatasetDict of the splits {list(dataset)}; pass one of them "
                                 f"(dataset[{split!r}])")
            raise InputError(f"{folder} holds the splits {list(dataset)}; pick one and save it alone "
                             "(dataset[split].save_to_disk(folder))")
        dataset = next(iter(dataset.values()))
    return dataset


def _saved_without_rows(folder: Path) -> bool:
    """Whether a folder ``save_to_disk`` wrote holds no rows: its state.json lists no data files."""
    try:
        return json.loads((folder / "state.json").read_text())["_data_files"] == []
    except Exception:  # no such file, not JSON, another layout: not this case
        return False


class WebDatasetSource(Source):
    """Samples of WebDataset ``.tar`` shards, as img2dataset writes a training set: a sample is the
    files sharing a key (``000012.jpg``, ``000012.txt``, ``000012.json``), named by extension as
    ``datasets``' webdataset loader names its columns. The caption is the ``.txt`` file, or else the
    ``.json``'s caption / text / prompt; ``caption_column`` / ``image_column`` name another extension.

    Each shard's headers are read once, seeking past the data, and a sample's files are read by
    offset: a multi-GB shard is scanned in place, never unpacked. Compressed shards (``.tar.gz``)
    cannot be read by offset and are refused."""

    def __init__(self, path: str | Path, caption_column: str | None = None, image_column: str | None = None,
                 captions: bool = True):
        path = Path(path)
        self.shards = tar_shards(path) if path.is_dir() else [path]
        if not self.shards:
            raise InputError(f"{path} holds no .tar shards")
        # per sample: (shard index, key, {extension: (offset, size)})
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for k, shard in enumerate(self.shards):
            self.samples += [(k, key, files) for key, files in _tar_samples(shard)]
        if not self.samples:
            raise ZeroRowsError(f"{path} holds no samples")
        extensions = sorted({e for _, _, files in self.samples for e in files})
        self.image_ext = _pick_extension(extensions, image_column, SHARD_IMAGE_EXTENSIONS, "image", path)
        if caption_column is not None:
            self.caption_ext = _pick_extension(extensions, caption_column, (), "caption", path)
        else:
            self.caption_ext = next((e for e in SHARD_CAPTION_EXTENSIONS if e in extensions), None)
            if self.caption_ext is None and captions:
                raise InputError(f"{path} has no captions: no sample has a .txt or .json file (files: {extensions})")
        self.caption_column = self.caption_ext
        # each sample's own file, first wanted first, where no column is named (see ``sample_columns``)
        self.image_tried = sample_columns(extensions, self.image_ext, image_column, SHARD_IMAGE_EXTENSIONS)
        self.caption_tried = sample_columns(extensions, self.caption_ext, caption_column, SHARD_CAPTION_EXTENSIONS)

    def __len__(self):
        return len(self.samples)

    @property
    def has_images(self):
        return self.image_ext is not None

    reduces_as_it_reads = True

    def rows(self, start, stop, reduce=None):
        out, handles = [], {}
        try:
            for i in range(start, min(stop, len(self))):
                k, key, files = self.samples[i]
                if k not in handles:
                    handles[k] = open(self.shards[k], "rb")
                f = handles[k]
                try:
                    cap, issue = caption_and_issue(self._caption(f, files))
                except OSError:  # as an unreadable image: a property of this row (a shard cut short), not of the scan
                    cap, issue = None, "unreadable"
                row = ScanRow(i, cap.strip() if isinstance(cap, str) else cap, issue, location=f"{self.shards[k].name}:{key}")
                image_ext = first_held(self.image_tried, files.__contains__)
                _fill_image(row, lambda: _read_member(f, files.get(image_ext)), reduce)
                out.append(row)
        finally:
            for f in handles.values():
                f.close()
        return out

    def _caption(self, f, files):
        caption_ext = first_held(self.caption_tried, files.__contains__)
        if caption_ext is None or caption_ext not in files:
            return None
        raw = _read_member(f, files[caption_ext])
        if caption_ext != "json":
            return raw
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return json_caption(meta)

    def describe(self):
        shards = []
        for p in self.shards:
            st = p.stat()
            shards.append([str(p.resolve()), st.st_size, int(st.st_mtime)])
        return {"kind": "webdataset", "shards": shards, "rows": len(self), "caption_column": self.caption_ext,
                "image_column": self.image_ext}


def _tar_samples(shard: Path, lower: bool = True) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (data offset, size)}) of a shard's samples, in the order they first appear.
    A key is the member's path up to the first dot of its file name, as WebDataset splits it; an
    extension is lower case, as the scan matches it, or, ``lower=False``, as datasets names its column."""
    import tarfile

    if shard.name.lower().endswith(COMPRESSED_TAR):
        raise InputError(f"{shard} is a compressed tar: its images cannot be read in place; decompress it to .tar")
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": plain tar alone, so data offsets are file offsets
            for m in tar:
                if not m.isfile():
                    continue
                folder, _, name = m.name.rpartition("/")
                if "." not in name or name.startswith("."):
                    continue  # no extension, or a hidden file: no part of a sample
                stem, ext = name.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower() if lower else ext] = (m.offset_data, m.size)
    except tarfile.TarError as e:
        raise InputError(f"{shard} is not a readable tar file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise InputError(f"could not read {shard}: {e.strerror or e}") from None
    return list(samples.items())


def folder_metadata(folder: Path) -> Path | None:
    """An image folder's ``metadata.jsonl`` or ``metadata.csv``, as ``datasets``' imagefolder reads it, or None."""
    return next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).exists()), None)


# the members that datasets' webdataset loader decodes, by their last extension (its DECODERS), and so
# can stop at; the others it hands over as bytes
_DECODED_AS_TEXT = ("txt", "text", "transcript")
_DECODED_AS_JSON = ("json", "jsn")
_DECODED_AS_INT = ("cls", "cls2", "index", "inx", "id")


def unreadable_sample_files(shards: list[Path]) -> list[str]:
    """``shard.tar:key.ext (reason)`` for each sample file that ``datasets``' webdataset loader stops at,
    so train names them: a .txt that is not UTF-8 (the scan reads it with U+FFFD and flags it), a .json
    that is not JSON (the scan reads the sample as uncaptioned) or that holds a lone surrogate (the
    scan reads it with U+FFFD: no Arrow column takes one), a .cls or .id that is not an integer."""
    found = []
    for shard in shards:
        with open(shard, "rb") as f:
            for key, files in _tar_samples(shard):
                for ext, member in files.items():
                    decoded_as = ext.rsplit(".", 1)[-1]
                    if decoded_as in _DECODED_AS_TEXT + _DECODED_AS_JSON + _DECODED_AS_INT:
                        try:
                            problem = _undecodable(_read_member(f, member), decoded_as)
                        except OSError as e:  # a shard cut short
                            problem = str(e)
                        if problem:
                            found.append(f"{shard.name}:{key}.{ext} ({problem[:120]})")
    return found


def webdataset_features(shards: list[Path]):
    """The columns to give ``datasets``' webdataset loader for shards whose samples do not all hold the
    same files (a .jpg here, a .png there; a .json in some), or None where they do. Unhelped, it types
    its columns by the first shard's first 5 samples: it refuses them if they differ ("don't share the
    same prefix or the same types") and drops the files of a kind they lack (a later sample's .png
    read as no image), where the scan reads each sample's own. Read from the shards' headers alone.
    A file datasets decodes to an array, audio or video, or a compressed one, is left out: neither
    a caption nor an image is taken from it."""
    import datasets
    from datasets.packaged_modules.webdataset.webdataset import EXTENSION_TO_COMPRESSION_FS_FILE_CLS, WebDataset

    held = {frozenset(files) for shard in shards for _, files in _tar_samples(shard, lower=False)}
    if len(held) <= 1:
        return None
    features = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
    for field in sorted(set().union(*held)):
        last = field.rsplit(".", 1)[-1].lower()
        if last in WebDataset.IMAGE_EXTENSIONS:
            features[field] = datasets.Image()
        elif last in _DECODED_AS_TEXT:
            features[field] = datasets.Value("string")
        elif last in _DECODED_AS_JSON:
            features[field] = datasets.Json()
        elif last in _DECODED_AS_INT:
            features[field] = datasets.Value("int64")
        elif last not in WebDataset.DECODERS and f".{last}" not in EXTENSION_TO_COMPRESSION_FS_FILE_CLS and not any(
                last in kinds for kinds in (WebDataset.AUDIO_EXTENSIONS, WebDataset.VIDEO_EXTENSIONS, WebDataset.MESH_EXTENSIONS)):
            features[field] = datasets.Value("binary")  # handed over as bytes (a .caption file)
    return datasets.Features(features)


def _undecodable(raw: bytes, decoded_as: str) -> str | None:
    """Why ``datasets`` cannot decode a sample file of this extension, or None."""
    try:
        if decoded_as in _DECODED_AS_INT:
            int(raw)
            return None
        # parsed from bytes as datasets parses it (json.loads reads UTF-16 and UTF-32 too)
        value = json.loads(raw) if decoded_as in _DECODED_AS_JSON else raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8: byte 0x{raw[e.start]:02x} at {e.start}"
    except ValueError as e:  # JSONDecodeError, or int's "invalid literal"
        return first_line(e)
    return next(filter(None, map(lone_surrogate, _json_strings(value))), None)


def _json_strings(value) -> Iterator[str]:
    """Every string in parsed JSON, keys too: each becomes an Arrow string when ``datasets`` reads it."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)


def json_caption(meta) -> object:
    """A shard sample's caption in its ``.json``: the first of caption / text / prompt that is set.
    img2dataset writes ``"caption": null`` where it had none, and ``datasets`` fills the keys that a
    sample lacks with None, so a key alone does not make a caption."""
    if not isinstance(meta, dict):
        return None
    return next((meta[c] for c in CAPTION_COLUMNS if meta.get(c) is not None), None)


def tar_shards(folder: Path) -> list[Path]:
    """The ``.tar`` shards of a folder that is one of WebDataset shards (img2dataset's output folder,
    its tables and stats beside them); none for an image folder with ``metadata.jsonl`` / ``.csv``."""
    if folder_metadata(folder) is not None:
        return []
    return sorted(folder.glob("*.tar"))


def _pick_extension(extensions: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, where: Path):
    if wanted is not None:
        wanted = wanted.lower().lstrip(".")
        if wanted not in extensions:
            raise InputError(f"{where} has no {what} files .{wanted} (its samples' files: {extensions})")
        return wanted
    return next((e for e in defaults if e in extensions), None)


def _read_member(f, place: tuple[int, int] | None) -> bytes | None:
    if place is None:
        return None
    offset, size = place
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:  # a shard cut short after it was indexed
        raise OSError(f"the shard ends {size - len(data)} bytes short of this file's end")
    return data


def default_columns(columns) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The caption and image columns tried, in order, on a dataset with these columns: a table's names,
    or, for one ``datasets``' webdataset loader read from shards (it adds ``__key__``, and names the
    other columns by a sample's file extensions), the shard rules the scan reads shards by in place.
    The loader names a column as the file's extension is written, so those match in any case (.JPG
    is the scan's .jpg); where none is present, the rules themselves, for a refusal to name."""
    if "__key__" in columns:
        return tuple(tuple(c for d in rules for c in columns if c.lower() == d) or rules
                     for rules in (SHARD_CAPTION_EXTENSIONS, SHARD_IMAGE_EXTENSIONS))
    return CAPTION_COLUMNS, IMAGE_COLUMNS


def sample_columns(columns, picked: str | None, named: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
    """The columns (a shard's file extensions) that each sample's caption or image is taken from, the
    first it holds first. Shards written from several sources may hold a .jpg in one sample and a
    .png in the next, a .txt in one and a .json alone in the next: with no column named, a sample
    gives its own, as the same order picks it (``picked`` is the first of ``defaults`` in ``columns``).
    A named column is the one column of every sample (a table's, ``caption_and_image_columns``, too)."""
    if picked is None:
        return ()
    if named is not None:
        return (picked,)
    return tuple(c for c in defaults if c in columns)


def first_held(tried: tuple[str, ...], holds) -> str | None:
    """The first of ``tried`` that a sample ``holds``, else the first (which it lacks), else None."""
    return next((c for c in tried if holds(c)), tried[0] if tried else None)


def column_caption(value, column: str):
    """A caption cell as a caption: a shard sample's ``.json`` column holds a dict, its caption inside."""
    return json_caption(value) if column.lower() == "json" and isinstance(value, dict) else value


def caption_and_image_columns(columns, caption_column: str | None, image_column: str | None, where,
                              captions: bool = True, images: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The columns a row's caption and its image are taken from, the first set first, by the scan's
    rules (``default_columns``, ``pick_column``): in a dataset read from shards with no column named,
    a sample's own file of each role (``sample_columns``); else one column each, () for none."""
    caption_defaults, image_defaults = default_columns(columns)
    caption = pick_column(columns, caption_column, caption_defaults, "caption", where, required=captions)
    image = pick_column(columns, image_column, image_defaults, "image", where, required=images)
    if "__key__" not in columns:  # a table's caption or image is one column, whatever its rows hold
        return tuple(c for c in (caption,) if c), tuple(c for c in (image,) if c)
    return (sample_columns(columns, caption, caption_column, caption_defaults),
            sample_columns(columns, image, image_column, image_defaults))


def undecoded_images(dataset, columns):
    """``dataset`` with those of ``columns`` that are ``datasets.Image`` left undecoded (bytes or a
    path): the reader decodes each row's, so an unreadable image is that row's problem, not the read's."""
    import datasets

    for column in columns:
        if isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def pick_column(columns, wanted, defaults, what, where, required=True):
    """The column ``wanted``, else the first of ``defaults`` present; a missing one is refused by name
    and, for a default, with the option that names another (``--caption-column``)."""
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise InputError(f"{where} has no {what} column {wanted!r} (columns: {columns})")
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise InputError(f"{where} has no {what} column ({' / '.join(defaults)}); name one with --{what.replace(' ', '-')}-column (columns: {columns})")
    return found


def open_source(dataset, caption_column: str | None = None, image_column: str | None = None,
                captions: bool = True) -> Source:
    """``memlab``, a folder (images or a saved ``datasets`` dataset), a table file, a hub dataset id, or a Dataset.
    ``captions=False``: a source read for its images alone needs no caption column."""
    if isinstance(dataset, Source):
        return dataset
    if not isinstance(dataset, (str, Path)):
        return HFDatasetSource(dataset, caption_column, image_column, captions)
    if str(dataset) == "memlab":
        return MemLabSource()
    path = Path(dataset)
    if not path.exists():
        from ..core.loading import looks_like_path

        if not looks_like_path(str(dataset)):  # owner/name, as diffmem train reads it: the scan vouches for the same rows
            return HFDatasetSource(_hub_dataset(str(dataset)), caption_column, image_column, captions)
        raise InputError(f"dataset not found: {path} (give 'memlab', an image folder, a .parquet / .jsonl / .json / .csv / .tsv file, "
                         "WebDataset .tar shards, a saved datasets folder or a hub dataset id owner/name)")
    if path.is_dir():
        if is_saved_dataset(path):
            return HFDatasetSource(path, caption_column, image_column, captions)
        if tar_shards(path):
            return WebDatasetSource(path, caption_column, image_column, captions)
        return ImageFolderSource(path, caption_column, captions)
    if path.name.lower().endswith((".tar",) + COMPRESSED_TAR):
        return WebDatasetSource(path, caption_column, image_column, captions)
    return TableSource(path, caption_column, image_column, captions=captions)


def _hub_dataset(dataset_id: str):
    """The train split of a hub dataset, as ``datasets`` loads it (from its cache when offline)."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # no network, no such dataset, no train split: datasets raises many kinds
        hint = "" if datasets.config.HF_HUB_OFFLINE else \
            " (offline, it is read from datasets' cache: set HF_HUB_OFFLINE=1 not to wait for the network)"
        raise InputError(f"could not load the hub dataset {dataset_id!r}: {kind_and_first_line(e)}{hint}") from None


def shards(source: Source, shard_size: int) -> Iterator[tuple[int, int, int]]:
    """(index, start, stop) of every shard."""
    n = len(source)
    for k, start in enumerate(range(0, n, shard_size)):
        yield k, start, min(start + shard_size, n)


__all__ = ["ZeroRowsError", "ScanRow", "Source", "MemLabSource", "ListSource", "ImageFolderSource", "TableSource",
           "HFDatasetSource", "WebDatasetSource", "open_source", "shards", "load_image", "is_saved_dataset",
           "load_saved_dataset"]
