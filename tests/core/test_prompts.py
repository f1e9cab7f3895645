import pytest

from diffmem.core.errors import InputError
from diffmem.core.prompts import ensure_writable_dir, read_prompts


def test_txt_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na dog\n\n")  # trailing blank lines are not prompts
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x", "index": 1, "url": "u"}\n{"caption": "y", "index": 2, "url": "u"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y"]
    (tmp_path / "p.csv").write_text("id,text,label\n1,hello,1\n2,world,0\n")
    assert read_prompts(tmp_path / "p.csv", "text") == ["hello", "world"]


def test_a_line_ends_only_at_a_line_break(tmp_path):
    """Scraped captions hold U+2028, NEL (U+0085) and form feeds, and JSON allows them raw inside a
    string; a line of a prompt file still ends only at \\n, \\r\\n or \\r, as in an editor."""
    import json

    odd = ["a red circle\u2028on a blue square", "caf\u0085 art", "page\x0cbreak", "two\u2029paragraphs"]
    (tmp_path / "p.txt").write_bytes(("\r\n".join(odd) + "\r\n").encode())
    assert read_prompts(tmp_path / "p.txt") == odd
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in odd) + "\n",
                                      encoding="utf-8")
    assert read_prompts(tmp_path / "p.jsonl") == odd
    (tmp_path / "blank.txt").write_text("a cat\u2028\n \na dog\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2: empty prompt"):  # numbered as an editor numbers lines
        read_prompts(tmp_path / "blank.txt")


def test_a_csv_error_names_the_line_its_row_starts_on(tmp_path):
    # a quoted caption over three lines and a blank line come before the bad row, on line 6
    (tmp_path / "p.csv").write_text('prompt,id\n"a cat\non a\nmat",1\n\n"  ",2\n', encoding="utf-8")
    with pytest.raises(InputError, match="line 6: empty prompt"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "ok.csv").write_text('prompt,id\n"a cat\non a mat",1\n', encoding="utf-8")
    assert read_prompts(tmp_path / "ok.csv") == ["a cat\non a mat"]


@pytest.mark.parametrize("sep, ending", [("\n", "\n"), ("\r\n", "\r\n"), ("\n", "")])
def test_a_csv_quote_left_open_is_named_by_line_not_read_as_one_last_prompt(tmp_path, sep, ending):
    # the csv module read a stray quote's field on through the rest of the file: five prompts came out
    # as three, the last "a quote left open\nprompt 3\nprompt 4\n", without a word
    lines = ["prompt", "prompt 0", '"two\nlines"', "", '"a quote left open', "prompt 3", "prompt 4"]
    (tmp_path / "p.csv").write_bytes(sep.join(lines).encode() + ending.encode())
    with pytest.raises(InputError, match=r"p.csv line 6: a quote opened in this row is never closed"):
        read_prompts(tmp_path / "p.csv")
    # closed, the same rows read, a quote inside an unquoted field and a quoted one ending in a line break too
    lines[4] = '"a quote closed"'
    lines[5] = 'prompt 3 is 5" tall'
    lines[6] = '"prompt 4\n"'
    (tmp_path / "p.csv").write_bytes(sep.join(lines).encode() + ending.encode())
    assert read_prompts(tmp_path / "p.csv") == ["prompt 0", "two\nlines", "a quote closed", 'prompt 3 is 5" tall', "prompt 4\n"]


def test_the_public_sd_v1_list_reads():
    from pathlib import Path

    f = Path(__file__).resolve().parents[1] / "data" / "sdv1_500_memorized.jsonl"
    prompts = read_prompts(f)
    assert len(prompts) == 500 and all(p.strip() for p in prompts)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("e.txt", b"", "holds no prompts"),
        ("blank.txt", b"a cat\n   \na dog\n", "line 2: empty prompt"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"prompt": "ok"}\n{not json}\n', "line 2 is not valid JSON"),
        # the first line's column holds for the whole file: a line without it is not read from another
        ("mixed.jsonl", b'{"prompt": "ok"}\n{"text": "x"}\n', "line 2 has no column 'prompt'"),
        ("nocol.csv", b"id,text\n1,hi\n", "no column 'prompt'"),
        # UTF-16 without its byte-order mark is valid UTF-8, a NUL after each letter
        ("utf16.txt", "a cat\nthe dog\n".encode("utf-16-le"), r"holds a NUL byte \(byte 1, line 1\): it looks like UTF-16"),
        ("utf16.csv", "prompt\na cat\n".encode("utf-16-le"), "holds a NUL byte"),
        # JSON may escape half of an emoji, cut from its pair where a scraped line was truncated
        ("half.jsonl", b'{"prompt": "ok"}\n{"prompt": "a cat \\ud83d"}\n',
         r"line 2: the prompt holds a lone surrogate \\ud83d at character 6: half of a character cut in two"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_prompts(f, "prompt" if name.endswith(".csv") else None)


def test_detect_results_feed_the_next_stage_flagged_only(tmp_path):
    """A detection result (its .parquet, or the same columns as .csv / .jsonl) reads as prompts; with
    flagged=True only the rows whose verdict is "memorized"."""
    import numpy as np

    from diffmem.detect import DetectionResult

    prompts = ["a cat", "a quiet orange cross", "a dog", "a velvet harbor"]
    scores = np.array([0.1, 0.9, 0.2, 0.8])
    res = DetectionResult(prompts, scores, scores.reshape(4, 1, 1), {"steps": [0]}, [0], "noise_norm", {}, threshold=0.5)
    res.save(tmp_path / "r.parquet")
    assert read_prompts(tmp_path / "r.parquet") == prompts
    assert read_prompts(tmp_path / "r.parquet", flagged=True) == ["a quiet orange cross", "a velvet harbor"]
    res.to_frame().to_csv(tmp_path / "r.csv", index=False)
    assert read_prompts(tmp_path / "r.csv", flagged=True) == ["a quiet orange cross", "a velvet harbor"]
    res.to_frame().to_json(tmp_path / "r.jsonl", orient="records", lines=True)
    assert read_prompts(tmp_path / "r.jsonl", flagged=True) == ["a quiet orange cross", "a velvet harbor"]
    # no calibration: no verdicts to filter on
    DetectionResult(prompts, scores, scores.reshape(4, 1, 1), {"steps": [0]}, [0], "noise_norm", {}).save(tmp_path / "u.parquet")
    with pytest.raises(InputError, match="no verdict column"):
        read_prompts(tmp_path / "u.parquet", flagged=True)
    with pytest.raises(InputError, match="--flagged needs a table"):
        read_prompts(tmp_path / "p.txt", flagged=True)
    none = DetectionResult(prompts, scores, scores.reshape(4, 1, 1), {"steps": [0]}, [0], "noise_norm", {}, threshold=5.0)
    none.save(tmp_path / "n.parquet")
    with pytest.raises(InputError, match="no prompt in .* is flagged"):
        read_prompts(tmp_path / "n.parquet", flagged=True)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_prompts(tmp_path / "x.parquet")
    with pytest.raises(InputError, match="no column 'caption'"):
        read_prompts(tmp_path / "r.parquet", "caption")
    # detect's .json results too, not read as lines of JSON text ('{', ' "method": ...')
    res.save(tmp_path / "r.json")
    assert read_prompts(tmp_path / "r.json") == prompts
    assert read_prompts(tmp_path / "r.json", flagged=True) == ["a quiet orange cross", "a velvet harbor"]
    DetectionResult(prompts, scores, scores.reshape(4, 1, 1), {"steps": [0]}, [0], "noise_norm", {}).save(tmp_path / "u.json")
    assert read_prompts(tmp_path / "u.json") == prompts
    with pytest.raises(InputError, match="no verdict column"):
        read_prompts(tmp_path / "u.json", flagged=True)
    import json

    edited = json.loads((tmp_path / "r.json").read_text())
    edited["scores"][1] = None  # a hand-edited file: its prompts read, no verdicts made up
    (tmp_path / "e.json").write_text(json.dumps(edited))
    assert read_prompts(tmp_path / "e.json") == prompts
    with pytest.raises(InputError, match="no verdict column"):
        read_prompts(tmp_path / "e.json", flagged=True)


def test_a_json_list_of_prompts_and_a_tsv_table_read(tmp_path):
    import json

    (tmp_path / "s.json").write_text(json.dumps(["a cat", "a dog"]))
    assert read_prompts(tmp_path / "s.json") == ["a cat", "a dog"]
    (tmp_path / "o.json").write_text(json.dumps([{"caption": "a cat", "id": 1}, {"caption": "a dog", "id": 2}]))
    assert read_prompts(tmp_path / "o.json") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "o.json", "caption") == ["a cat", "a dog"]
    (tmp_path / "t.tsv").write_text("id\tcaption\n1\ta cat, sitting\n2\ta dog\n")  # the comma is the caption's
    assert read_prompts(tmp_path / "t.tsv") == ["a cat, sitting", "a dog"]
    for data, message in (([], "holds no prompts"), ({"a": 1}, "is JSON, but neither a list of prompts"),
                          (["a cat", {"prompt": "a dog"}], "is JSON, but neither"),
                          ([{"prompt": "a cat"}, {"text": "a dog"}], "item 2 has no 'prompt'"),
                          ([{"prompt": 5}], "item 1: the prompt is not text"), (["a cat", "  "], "item 2: empty prompt")):
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(InputError, match=message):
            read_prompts(tmp_path / "bad.json")
    with pytest.raises(InputError, match="a list of strings, without columns"):
        read_prompts(tmp_path / "s.json", "caption")
    (tmp_path / "broken.json").write_text('["a cat",\n]')
    with pytest.raises(InputError, match=r"not valid JSON \(line 2\)"):
        read_prompts(tmp_path / "broken.json")
    # a text file has no columns, and the refusal names every format that has, these two with them
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(InputError, match=r"--column applies to table files \(.*\.json / .*\.tsv.*\), not p.txt"):
        read_prompts(tmp_path / "p.txt", "caption")
    with pytest.raises(InputError, match=r"--flagged needs a table .*\.tsv"):
        read_prompts(tmp_path / "p.txt", flagged=True)


def test_a_nul_character_in_a_parquet_prompt_is_named(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": ["a cat", "a\x00dog"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"row 2: the prompt holds a NUL character \('a\\x00dog'\)"):
        read_prompts(tmp_path / "p.parquet")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_prompts(tmp_path / "nope.txt")


def test_output_folder_checks(tmp_path):
    assert ensure_writable_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        ensure_writable_dir(tmp_path / "f" / "out")


def test_bidirectional_formatting_characters_are_shown_not_obeyed():
    from markupsafe import Markup

    from diffmem.core.prompts import html_environment, reveal_bidi_controls, terminal_text

    # overrides, embeddings and isolates reorder the text after them; the marks LRM / RLM do not
    caption = "a red \u202ecircle\u202c, \u2067isolated\u2069 \u200e."
    assert reveal_bidi_controls(caption) == "a red [U+202E]circle[U+202C], [U+2067]isolated[U+2069] \u200e."
    shown = terminal_text(caption)  # one character for one, so styles over the text keep their places
    assert len(shown) == len(caption) and shown == "a red \ufffdcircle\ufffd, \ufffdisolated\ufffd \u200e."
    page = html_environment().from_string('<p title="{{ p }}">{{ p }} {{ frag }}</p>').render(
        p="<b>\u202ex</b>", frag=Markup("<i>\u2066y</i>"))
    # escaped and shown in text and attribute alike; a fragment already safe stays markup
    assert page == '<p title="&lt;b&gt;[U+202E]x&lt;/b&gt;">&lt;b&gt;[U+202E]x&lt;/b&gt; <i>[U+2066]y</i></p>'


def test_a_parquet_prompt_file_is_read_in_its_prompt_column_alone(tmp_path, monkeypatch):
    # a training set's captions share their file with its image bytes, which were read with them
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions = ["a cat", "a dog", "a bird"]
    pq.write_table(pa.table({"image": [b"\xff" * 4096] * 3, "text": captions,
                             "verdict": ["memorized", "not memorized", "memorized"]}), tmp_path / "train.parquet")
    asked = []
    for owner, name in ((pq, "read_table"), (pq.ParquetFile, "read")):
        def recording(*args, columns=None, _original=getattr(owner, name), **kwargs):
            asked.append(columns)
            return _original(*args, columns=columns, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    assert read_prompts(tmp_path / "train.parquet") == captions and asked == [["text"]]
    asked.clear()
    assert read_prompts(tmp_path / "train.parquet", flagged=True) == ["a cat", "a bird"] and asked == [["text", "verdict"]]
    with pytest.raises(InputError, match=r"has no column 'caption' \(columns: \['image', 'text', 'verdict'\]\)"):
        read_prompts(tmp_path / "train.parquet", "caption")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(InputError, match="none.parquet holds no prompts"):
        read_prompts(tmp_path / "none.parquet")
