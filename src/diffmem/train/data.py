"""Image-caption sources for ``diffmem train``, read with Hugging Face ``datasets``.

- ``memlab``: the MemLab training set (built from its seed);
- a folder of images with ``metadata.jsonl`` or ``metadata.csv`` (``file_name`` + caption
  column): the ``imagefolder`` layout;
- a ``.parquet``, ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file whose image column holds image bytes or paths;
- WebDataset ``.tar`` shards, one or a folder of them (img2dataset's output), through ``datasets``'
  webdataset loader: columns named by extension, the caption ``txt`` (else the ``.json``'s caption /
  text / prompt, as the scan reads it), the image ``jpg`` / ``png`` / ..., each sample's own where
  shards mix formats (the loader is given every sample's columns, ``scan.sources.webdataset_features``);
- a folder written by ``datasets.Dataset.save_to_disk``, or a hub dataset id (cached locally); one
  made from shards (it has a ``__key__`` column) is read by the shards' rules.

The caption and image columns are found by the scan's rules (``scan.sources.default_columns``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import InputError, first_line, kind_and_first_line
from ..core.images import centre_square, image_cell, open_image
# the scan's rules for which columns hold the caption and the image, so that a scan vouches for the
# captions and images a model trains on
from ..scan.sources import (COMPRESSED_TAR, TableSource, ZeroRowsError, caption_and_issue, column_caption,
                            caption_and_image_columns, first_held, folder_metadata, is_saved_dataset,
                            load_saved_dataset, open_source, tar_shards, undecoded_images,
                            unreadable_sample_files, webdataset_features)


NOTHING_TO_TRAIN = "nothing to train on"  # after what the scan's reader found empty ("X has zero rows")
# the scan's caption issues as a skipped row names them; the others read "caption not UTF-8" etc.
_CAPTION_PROBLEMS = {"missing": "empty caption", "empty": "empty caption", "lone surrogate": "caption holds a lone surrogate"}


def _to_array(img, size: int) -> np.ndarray:
    """Upright (EXIF), centre-cropped to a square and resized to ``size``: float32 (size, size, 3) in [0, 1]."""
    return np.asarray(centre_square(open_image(img), size), dtype=np.float32) / 255.0


def _open_hf(source: str):
    import datasets

    from ..core.loading import looks_like_path

    p = Path(source)
    try:
        if p.is_dir() and is_saved_dataset(p):  # a DatasetDict's too, as the scan reads it
            return load_saved_dataset(p)
        if p.is_dir():
            shards = tar_shards(p)
            if shards:  # the scan reads the same folders as shards
                return _load_shards(source, shards)
            if folder_metadata(p) is None:
                raise InputError(f"{p} has no metadata.jsonl or metadata.csv: an image folder needs captions "
                                 "(columns file_name and caption/text)")
            return datasets.load_dataset("imagefolder", data_dir=str(p), split="train")
        if p.name.lower().endswith(COMPRESSED_TAR):  # refused as the scan refuses it, so both read the same shards
            raise InputError(f"{p} is a compressed tar: decompress it to .tar (the scan reads shards in place)")
        suffix = p.suffix.lower()  # D.PARQUET as the scan reads it
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(p), split="train")
        if suffix in (".jsonl", ".json"):
            hf = datasets.load_dataset("json", data_files=str(p), split="train")
            if suffix == ".json" and _escapes_a_surrogate(p):
                # a JSON list, which datasets reads whole with pandas' ujson: it drops a lone surrogate
                # without a word, where JSON Lines fail in Arrow and are refused by row below (datasets
                # read this file, so the scan's refusal of it, if any, is not train's)
                _check_rows_as_the_scan_reads(p)
            return hf
        if suffix in (".csv", ".tsv"):  # a table the scan reads, so one a curator scanned can be trained on
            return datasets.load_dataset("csv", data_files=str(p), split="train", sep="\t" if suffix == ".tsv" else ",")
        if suffix == ".tar":
            return _load_shards(source, [p])
        if p.exists():
            raise InputError(f"unsupported data file {p.name}: use a folder, .parquet, .jsonl, .json, .csv, .tsv or WebDataset .tar shards")
        if looks_like_path(source):
            # not an owner/name hub id: asking the hub would only retry for half a minute and fail
            raise InputError(f"training data not found: {source} (give 'memlab', an image folder with metadata, "
                             "a .parquet / .jsonl / .json / .csv / .tsv file, WebDataset .tar shards, a saved datasets folder or a hub "
                             "dataset id owner/name)")
        return datasets.load_dataset(source, split="train")
    except ZeroRowsError as e:  # the scan's refusal, in its words "nothing to scan"
        raise e.for_job(NOTHING_TO_TRAIN) from None
    except InputError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs the source and the reason
        raise _read_error(source, e) from None


def _load_shards(source: str, shards: list[Path]):
    import datasets

    # a shard without members, which the scan reads as no samples, stops datasets' loader with
    # "Must pass at least one table", however many samples the other shards hold
    with_samples = [s for s in shards if _holds_members(s)]
    if not with_samples:  # worded for training by _open_hf, as the scan's own refusal of it
        raise ZeroRowsError(f"{source} holds no samples")
    features = webdataset_features(with_samples)
    try:
        return datasets.load_dataset("webdataset", data_files=[str(s) for s in with_samples], split="train",
                                     features=features)
    except Exception:
        # datasets stops at a sample's .json that is not JSON, saying only "An error occurred while
        # generating the dataset", and at a .txt that is not UTF-8 or a lone surrogate naming no file:
        # name the files, which the curator can mend or remove
        bad = unreadable_sample_files(shards)
        if not bad:
            raise
        raise InputError(f"diffmem train reads shards with datasets' webdataset loader, which cannot read {len(bad)} "
                         f"sample file(s) in {source}, the first {bad[0]}; the scan reads a .txt that is not UTF-8 "
                         "or a lone surrogate with U+FFFD in its place, and a .json that is not JSON as no caption: "
                         "mend or remove them") from None


def _escapes_a_surrogate(p: Path) -> bool:
    """Whether ``p`` holds a JSON escape of a surrogate (``\\ud83d``), paired or not: only then is the
    file read a second time, by row, to look for a lone one."""
    import mmap
    import re

    if p.stat().st_size == 0:  # mmap refuses an empty file
        return False
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return re.search(rb"\\u[dD][89a-fA-F]", m) is not None


def _text_table(p: Path) -> Path | None:
    """The file of text rows behind a source (a folder's metadata.jsonl / .csv), whose rows the scan
    reads one by one and datasets reads whole, or None."""
    table = folder_metadata(p) if p.is_dir() else p
    return table if table is not None and table.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv") else None


def _holds_members(shard: Path) -> bool:
    """Whether a .tar holds anything, read from its first header alone."""
    import tarfile

    try:
        with tarfile.open(shard) as t:
            return t.next() is not None
    except (tarfile.TarError, OSError):  # left to the loader, whose failure names what is wrong with it
        return True


def _empty_source(p: Path) -> ZeroRowsError | None:
    """The scan's reader's refusal of ``p`` as empty ("X has zero rows", "X holds no samples"), or None:
    a Parquet file, shards (a text table's rows are checked by ``_check_rows_as_the_scan_reads``)."""
    if not p.exists():
        return None
    try:
        open_source(p, captions=False)
    except ZeroRowsError as e:
        return e
    except Exception:  # any other refusal is not this one: datasets' failure is worded as it is
        return None
    return None


def _check_rows_as_the_scan_reads(table: Path) -> str | None:
    """Refuse, by row, a table that holds a caption datasets cannot read: it refuses the whole file (or
    fails when it reaches the row) with words that name neither the row nor the cause, where the scan
    reads the row with U+FFFD in place of the bad bytes or of the lone surrogate, and flags it.

    Where the scan's reader refuses the file too, its words, which name the line (datasets' name a
    character offset or a row counted from 0), are returned; a table without rows is refused as such."""
    try:
        frame = TableSource(table, captions=False).frame
    except ZeroRowsError as e:  # its words speak of scanning
        raise e.for_job(NOTHING_TO_TRAIN) from None
    except InputError as e:
        return str(e)
    except Exception:  # the scan's reader failed where it should not: datasets' own words stand, not a second error's
        return None
    import pandas as pd

    neither = pd.Series(False, index=frame.index)  # a .csv has no surrogates, an empty table no flags
    not_utf8 = frame["__not_utf8__"].astype(bool) if "__not_utf8__" in frame else neither
    surrogates = frame["__lone_surrogate__"].notna() if "__lone_surrogate__" in frame else neither
    bad = not_utf8 | surrogates
    if not bad.any():
        return None
    row = int(bad.idxmax())
    if not_utf8[row]:
        what = "is not UTF-8 (a byte in another encoding, Latin-1 say)"
    else:
        columns = ", ".join(map(repr, frame.at[row, "__lone_surrogate__"]))
        what = f"({columns}) holds a lone surrogate, half of a character cut in two (an emoji escaped as \\ud83d, say)"
    count = int(bad.sum())
    raise InputError(f"{table} row {row} {what}; {count} of its {len(frame)} rows {'is' if count == 1 else 'are'} not "
                     f"UTF-8 or {'holds' if count == 1 else 'hold'} a lone surrogate. datasets, which diffmem train reads "
                     "the file with, cannot read such a row as written; the scan reads it with U+FFFD in place of what it cannot read: "
                     "mend or remove each"
                     + ("; a whole file in Latin-1 re-encodes with iconv -f latin1 -t utf-8" if not_utf8.any() else ""))


def _read_error(source: str, error: Exception) -> InputError:
    """datasets' failure to read ``source`` as one line: by row where the scan's reader finds a caption
    datasets cannot read (that refusal is raised instead), in the scan's words where it refuses the file
    too or finds it empty, else the reason in datasets' reader's words. The scan's reader reads the
    source once: datasets' words for an empty one were 'Instruction "train" corresponds to no data!'
    for a header alone, StopIteration for an empty .jsonl, IndexError for a folder's, an ArrowInvalid
    for Parquet and for shards whose members make no sample."""
    if (table := _text_table(Path(source))) is not None:
        if words := _check_rows_as_the_scan_reads(table):
            return InputError(f"could not read training data {source!r}: {words}")
    elif (empty := _empty_source(Path(source))) is not None:
        return empty.for_job(NOTHING_TO_TRAIN)
    if type(error).__name__ == "DatasetGenerationError" and (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # "An error occurred while generating the dataset": the reason is its cause
    return InputError(f"could not read training data {source!r}: {kind_and_first_line(error)}")


def _rows_read(hf, source: str):
    """The rows of ``hf``: a .jsonl's byte that is not UTF-8 is taken in whole and fails only when its
    row is read, then refused by row as when datasets refuses the file."""
    try:
        yield from hf
    except UnicodeDecodeError as e:
        raise _read_error(source, e) from None


def iter_pairs(source: str, size: int, caption_column: str | None = None, image_column: str | None = None,
               limit: int | None = None, chunk: int = 64, problems: list | None = None,
               progress: bool = False, start: int = 0) -> Iterator[tuple[np.ndarray, list[str], int]]:
    """Usable (images (k, size, size, 3), captions, next_row) in chunks of at most ``chunk`` rows,
    read in order from source row ``start``; ``next_row`` is the source row after the chunk's last,
    where a later call can pick up.

    Only a chunk of decoded images is held at a time, so a caller that encodes each chunk to
    latents never holds the whole data set as pixels (at 512 x 512 a float32 image is 3 MB, its SD
    latent 64 kB). Unreadable images and empty captions are skipped and appended to ``problems``;
    no usable row at all is an error, raised once the source is exhausted.
    """
    from tqdm.auto import tqdm

    problems = [] if problems is None else problems
    if source == "memlab":
        from ..memlab import dataset as ds

        if size != 32:
            raise InputError(f"MemLab images are 32x32; this model wants {size}x{size}")
        d = ds.build()
        rows = d.rows[start:][:limit]
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            yield np.stack([d.image(r.image_id) for r in part]), [r.caption for r in part], start + i + len(part)
        return
    hf = _open_hf(source)
    cols = hf.column_names
    caption_tried, image_tried = caption_and_image_columns(cols, caption_column, image_column, source)
    hf = undecoded_images(hf, image_tried)
    total = len(hf)
    if start >= total > 0:  # all read before (datasets' select refuses an empty range at the end)
        return
    if start:
        hf = hf.select(range(start, total))
    images, captions, used = [], [], 0
    # a table file's relative image paths are looked for beside it, as the scan looks; a folder's rows
    # (a saved dataset's, a hub dataset's) in the working directory alone, as the scan and datasets look
    base = Path(source).parent if Path(source).is_file() else None
    rows = tqdm(_rows_read(hf, source), desc="reading images", unit="row", initial=start, total=total, disable=not progress)
    next_row = start
    for i, row in enumerate(rows, start):
        if limit is not None and used >= limit:
            break
        next_row = i + 1
        # by the scan's rules: bytes (a shard's file of an extension datasets does not decode, .caption)
        # read as UTF-8, and a number or a list (the wrong column) not taken for text
        cap = first_held(caption_tried, lambda c: row[c] is not None)
        caption, issue = caption_and_issue(column_caption(row[cap], cap))
        if issue is not None:
            problems.append({"row": i, "problem": _CAPTION_PROBLEMS.get(issue, f"caption {issue}")})
            continue
        try:
            img = image_cell(row[first_held(image_tried, lambda c: row[c] is not None)], base)
            if img is None:
                problems.append({"row": i, "problem": "missing image"})
                continue
            images.append(_to_array(img, size))
        except (UnidentifiedImageError, OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
            # the kind to count by, and Pillow's or the OS's words, which name the file, to mend it by
            problems.append({"row": i, "problem": f"unreadable image: {type(e).__name__}", "detail": first_line(e)})
            continue
        captions.append(caption)
        used += 1
        if len(images) == chunk:
            yield np.stack(images), captions, next_row
            images, captions = [], []
    if images:
        yield np.stack(images), captions, next_row
    if not used and not start:
        first = f", the first: row {problems[0]['row']}, {describe_problem(problems[0])}" if problems else ""
        raise InputError(f"no usable image-caption pairs in {source} ({len(problems)} problem rows{first})")


def load_pairs(source: str, size: int, caption_column: str | None = None, image_column: str | None = None,
               limit: int | None = None) -> tuple[np.ndarray, list[str], list[dict]]:
    """(images (N, size, size, 3), captions, problems): all of :func:`iter_pairs` at once."""
    problems: list[dict] = []
    chunks = list(iter_pairs(source, size, caption_column, image_column, limit, problems=problems))
    return np.concatenate([c[0] for c in chunks]), [c for _, caps, _ in chunks for c in caps], problems


def describe_problem(problem: dict) -> str:
    """A problem row as a person reads it: its kind, then its detail where there is one."""
    return f"{problem['problem']} ({problem['detail']})" if problem.get("detail") else problem["problem"]
