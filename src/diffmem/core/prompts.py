"""Reading prompt files: ``.txt`` (one per line), ``.jsonl``, ``.csv`` / ``.tsv`` and ``.parquet`` (a chosen
column), and ``.json``: a list of prompts (strings, or objects with a chosen key) or detect's results.

Every problem is an ``InputError`` that names the file and the line: an empty file, an empty
prompt line, bytes that are not UTF-8, a missing column, a malformed JSON line.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import InputError

DEFAULT_COLUMNS = ("prompt", "caption", "text")

# the explicit bidirectional formatting characters (embeddings, overrides, isolates): invisible, and
# their effect runs on past the word they stand in, so a right-to-left override in a scraped caption
# shows the words after it reversed ("circle on a blue square" as "erauqs eulb a no elcric") and
# misplaces the shading of an explanation. The marks (LRM, RLM) only sway their neighbours: left alone.
_BIDI_CONTROLS = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))

# control characters but line breaks and tabs, drawn as their Unicode pictures (ESC as "␛"), one
# character for one so that styles over a text keep their places; bidi controls have no picture
_CONTROL_PICTURES = {**{c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t"}, 0x7F: 0x2421,
                     **{c: 0xFFFD for c in (*range(0x80, 0xA0), *_BIDI_CONTROLS)}}

# in HTML a mark of any length fits: the code point, which a reader can look up
_BIDI_NAMED = {c: f"[U+{c:04X}]" for c in _BIDI_CONTROLS}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """What is wrong with ``text`` if it holds a lone UTF-16 surrogate, else None. JSON can escape
    one (half of an emoji cut in two, in a truncated scraped caption), and Python reads a byte of the
    command line that is not UTF-8 as one ("caf\\xe9" typed in a Latin-1 terminal); no tokenizer and
    no Parquet file takes it."""
    m = _LONE_SURROGATE.search(text)
    if m is None:
        return None
    c = ord(m.group())
    cause = (f"the byte 0x{c - 0xDC00:02x}, which is not UTF-8 (a terminal or file in another encoding?)"
             if 0xDC80 <= c <= 0xDCFF else "half of a character cut in two (an emoji, say)")
    return f"holds a lone surrogate \\u{c:04x} at character {m.start()}: {cause}; the tokenizer cannot read it"


def replace_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, as a decoder replaces a bad byte."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def terminal_text(text: str) -> str:
    """``text`` with its control characters shown, not obeyed: a prompt or a scraped caption printed
    to a terminal as it is could move the cursor, recolour or clear the screen ("\x1b[2J"), or
    reverse the rest of the line (U+202E, in terminals that lay out bidirectional text)."""
    return text.translate(_CONTROL_PICTURES)


def reveal_bidi_controls(text: str) -> str:
    """``text`` with its bidirectional formatting characters shown by code point ("[U+202E]"), not
    obeyed: a browser, or matplotlib laying out a chart's text, would reorder the text after them.
    Escaping is still an HTML page's to do."""
    return text.translate(_BIDI_NAMED)


def html_environment(**kwargs):
    """A jinja2 environment for pages that show user text: every ``{{ value }}`` escaped and its
    bidirectional formatting characters shown (``reveal_bidi_controls``), in text and in attributes
    alike. The marks hold no markup character, so fragments already made safe (``Markup``) stay safe."""
    from jinja2 import Environment
    from markupsafe import Markup

    def shown(value):
        if isinstance(value, Markup):
            return Markup(reveal_bidi_controls(str(value)))
        return reveal_bidi_controls(value) if isinstance(value, str) else value

    return Environment(autoescape=True, finalize=shown, **kwargs)


# the prompt files read as tables, where --column picks the prompt; any other file is one prompt a line
TABLES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TABLE_SUFFIXES = " / ".join(TABLES)
PROMPT_FILES = f".txt / {TABLE_SUFFIXES}"  # as the commands' help lists them


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(f"prompt file not found: {path}")
    if path.is_dir():
        raise InputError(f"prompt path is a folder, not a file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}, line {line}); re-save it as UTF-8") from None
    if "\x00" in text:  # UTF-16 without its byte-order mark decodes as UTF-8 with a NUL after each letter
        nul = raw.index(b"\x00")
        line = raw[:nul].count(b"\n") + 1
        raise InputError(f"{path} holds a NUL byte (byte {nul}, line {line}): it looks like UTF-16 or a binary file; "
                         "re-save it as UTF-8 text")
    return text


# a line of a prompt file ends where an editor's does, and `wc -l` counts: at \n, \r\n or \r. Python's
# str.splitlines also breaks at U+2028 / U+2029, NEL (U+0085, what a cp1252 ellipsis becomes read as
# Latin-1), form feed and more, all of which scraped captions hold, and JSON allows raw inside a string
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> list[str]:
    return _LINE_BREAK.split(text)


def iter_prompts(path: str | Path, column: str | None = None, flagged: bool = False) -> Iterator[str]:
    """Yield prompts one by one (the whole file is checked for encoding first).

    ``flagged``: only the rows whose ``verdict`` is "memorized", from a table that has one (what
    ``diffmem detect`` writes with a calibration: its .parquet or .json, or the same columns as
    .csv / .jsonl), so detection's output feeds explain and mitigate directly."""
    path = Path(path)
    suffix = path.suffix.lower()
    if flagged and suffix not in TABLES:
        raise InputError(f"--flagged needs a table with a verdict column (detect's .parquet or .json, or .csv / .tsv / "
                         f".jsonl), not {path.name}")
    n = 0
    if suffix in (".parquet", ".json"):
        if suffix == ".parquet":
            rows, col, unit = *_parquet_rows(path, column, flagged), "row"
        else:
            rows, unit = _json_rows(path, column), "item"
            col = _pick_column(path, column, list(rows[0]) if rows else [])
        for i, row in enumerate(rows, 1):
            if col not in row:  # a JSON list's objects need not share their keys: the first one's holds
                raise InputError(f"{path} {unit} {i} has no {col!r} (keys: {sorted(row)})")
            if _kept(row, flagged, path, i):
                yield _check(row[col], path, i, unit)
                n += 1
        _check_count(path, n, flagged)
        return
    text = _read_text(path)
    if suffix == ".jsonl":
        col = column
        for i, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {i} is not a JSON object")
            # the first line chooses the column for the whole file, so a line missing it is an error
            # rather than silently read from another column
            col = col or next((c for c in DEFAULT_COLUMNS if c in row), None)
            if col is None or col not in row:
                raise InputError(f"{path} line {i} has no column {col or ' / '.join(DEFAULT_COLUMNS)!r} (keys: {sorted(row)})")
            if _kept(row, flagged, path, i):
                yield _check(row[col], path, i)
                n += 1
    elif suffix in (".csv", ".tsv"):
        header, rows = read_csv(text, path, delimiter="\t" if suffix == ".tsv" else ",")
        col = _pick_column(path, column, header)
        for line, _, row in rows:
            if _kept(row, flagged, path, line):
                yield _check(row[col], path, line)
                n += 1
    else:
        if column:
            raise InputError(f"--column applies to table files ({TABLE_SUFFIXES}), not {path.name}")
        lines = _lines(text)
        while lines and not lines[-1].strip():  # a trailing newline is not an empty prompt
            lines.pop()
        for i, line in enumerate(lines, 1):
            yield _check(line, path, i)
            n += 1
    _check_count(path, n, flagged)


def read_csv(text: str, path: Path, delimiter: str = ",") -> tuple[list[str], list[tuple[int, int, dict]]]:
    """The header and the rows of CSV ``text``, each row as (the line it starts on, the line it ends on,
    the row). A quoted caption may hold line breaks and the reader skips blank lines, so rows and lines
    do not pair one to one.

    A quote left open (a stray quote in a scraped caption) runs its field on through every line after
    it: the csv module reads the rest of the file as one last row without a word, or, past its field
    limit, stops with words that name no line. Both are refused, naming the line."""
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    rows, ended = [], 1  # ended: the last line of the header, then of each row read
    try:
        header = reader.fieldnames or []
        for row in reader:
            rows.append((_row_first_line(reader.line_num, row), reader.line_num, row))
            ended = reader.line_num
    except csv.Error as e:
        hint = ("; most likely a quote left open, which runs one field on through every line after it"
                if "field limit" in str(e) else "")
        raise InputError(f"{path}: the row after line {ended} is not CSV diffmem can read ({e}){hint}") from None
    if (opened := _left_open(text, rows[-1][0] if rows else 1, delimiter)) is not None:
        raise InputError(f"{path} line {opened}: a quote opened in this row is never closed, so the csv module reads every "
                         'line after it as one field; close it, or double a quote that is part of the text ("")')
    return header, rows


def _row_first_line(last_line: int, row: dict) -> int:
    """The line a CSV row starts on, from the line it ends on (the line before, for a row left open
    at the end of a file that ends in a line break, which its last field holds)."""
    fields = [v for value in row.values() for v in (value if isinstance(value, list) else [value])]
    return last_line - sum(v.count("\n") for v in fields if isinstance(v, str))


def _left_open(text: str, from_line: int, delimiter: str) -> int | None:
    """The line of the row that ``text`` ends inside a quote of, or None: the csv module tells it only
    when strict, which also refuses what the lenient reader takes (``"a" b``), so only the last row or
    two, from ``from_line``, are read strictly."""
    reader = csv.reader(io.StringIO("".join(itertools.islice(io.StringIO(text), from_line - 1, None))),
                        delimiter=delimiter, strict=True)
    starts = 1
    try:
        for _ in reader:
            starts = reader.line_num + 1
    except csv.Error as e:
        if str(e) == "unexpected end of data":  # strict's words for the end of the text inside a quote
            return from_line - 1 + starts
    return None


def _json_rows(path: Path, column: str | None) -> list[dict]:
    """A .json file's prompts as rows: a list of strings (each a prompt), a list of objects (a key of
    them, as the lines of a .jsonl), or detect's saved results (its prompts, with their verdicts when
    it was calibrated). Anything else is refused, not read as lines of text."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):  # DetectionResult.save
        rows = [{"prompt": p} for p in data["prompts"]]
        scores, threshold = data.get("scores"), data.get("threshold")
        numbers = (int, float)  # a hand-edited file: no verdicts rather than a TypeError
        if isinstance(threshold, numbers) and isinstance(scores, list) and len(scores) == len(rows) \
                and all(isinstance(x, numbers) for x in scores):
            for row, score in zip(rows, scores):
                row["verdict"] = "memorized" if score > threshold else "not memorized"
        return rows
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        if column:
            raise InputError(f"{path} is a list of strings, without columns: --column applies to a list of objects")
        return [{"prompt": x} for x in data]
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        return data
    if isinstance(data, list) and not data:
        raise InputError(f"{path} holds no prompts")
    raise InputError(f"{path} is JSON, but neither a list of prompts (strings, or objects with a prompt / caption / "
                     "text key) nor detect's results (an object with \"prompts\")")


def _parquet_rows(path: Path, column: str | None, flagged: bool) -> tuple[list[dict], str]:
    """The rows of a .parquet file in its prompt column (and verdicts, for ``flagged``) alone, and that
    column's name: a training set's captions often share their file with the image bytes, which read
    with them took about five times the file's size in memory."""
    if not path.exists():
        raise InputError(f"prompt file not found: {path}")
    if path.is_dir():
        raise InputError(f"prompt path is a folder, not a file: {path}")
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        fields = file.schema_arrow.names
        col = _pick_column(path, column, fields)
        wanted = [col] + (["verdict"] if flagged and "verdict" in fields and col != "verdict" else [])
        return file.read(columns=wanted).to_pylist(), col
    except InputError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None


def _pick_column(path: Path, column: str | None, fields: list[str]) -> str:
    col = column or next((c for c in DEFAULT_COLUMNS if c in fields), None)
    if col is None or col not in fields:
        raise InputError(f"{path} has no column {column or ' / '.join(DEFAULT_COLUMNS)!r} (columns: {fields})")
    return col


def _kept(row: dict, flagged: bool, path: Path, line: int) -> bool:
    if not flagged:
        return True
    if "verdict" not in row:
        raise InputError(f"{path} has no verdict column: --flagged needs detect's output with a calibration "
                         "(diffmem detect --calibration / --calibrate-with)")
    return row["verdict"] == "memorized"


def _check_count(path: Path, n: int, flagged: bool) -> None:
    if n == 0:
        raise InputError(f"no prompt in {path} is flagged as memorized" if flagged else f"{path} holds no prompts")


def _check(value, path: Path, line: int, unit: str = "line") -> str:
    if not isinstance(value, str):
        raise InputError(f"{path} {unit} {line}: the prompt is not text ({value!r})")
    if not value.strip():
        raise InputError(f"{path} {unit} {line}: empty prompt")
    if "\x00" in value:
        raise InputError(f"{path} {unit} {line}: the prompt holds a NUL character ({value!r})")
    if problem := lone_surrogate(value):
        raise InputError(f"{path} {unit} {line}: the prompt {problem}")
    return value


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """A string is one prompt (as diffusers' pipelines take it), not a sequence of one-letter prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or not isinstance(prompts, Iterable):
        raise InputError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    return list(prompts)


def read_prompts(path: str | Path, column: str | None = None, flagged: bool = False) -> list[str]:
    return list(iter_prompts(path, column, flagged))


def ensure_writable_dir(folder: str | Path) -> Path:
    """Check, before any work starts, that ``folder`` can be created and written to."""
    import os
    import tempfile

    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output folder {folder} cannot be created: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".diffmem-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise InputError(f"output folder {folder} is not writable: {e.strerror}") from None
    return folder


def ensure_not_an_input(out: str | Path, **inputs: str | Path | None) -> None:
    """Refuse a results file that is one of the files the run reads (``prompts=...``): writing it
    would replace them, and the run would resume from what it wrote."""
    out = Path(out)
    for name, path in inputs.items():
        if path is not None and out.exists() and Path(path).exists() and out.samefile(path):
            raise InputError(f"the results file {out} is the {name} file; writing it would replace what the run "
                             "reads: choose another --out")


def warn_if_in_reference(prompts: Sequence[str], reference: Sequence[str], reference_name: str) -> None:
    """Warn when prompts to judge are also reference prompts: a calibration takes every reference
    prompt for non-memorized, so a memorized one among them raises the threshold it is judged by."""
    import warnings

    shared = sorted(set(prompts) & set(reference))
    if shared:
        warnings.warn(f"{len(shared)} of the prompts to judge {'is' if len(shared) == 1 else 'are'} also in the reference "
                      f"prompts ({reference_name}), e.g. {shared[0]!r}: the calibration counts {'it' if len(shared) == 1 else 'them'} "
                      "as non-memorized, and a memorized one among them raises the threshold it is judged by", stacklevel=2)
