from markdown_it import MarkdownIt

from diffmem.scan import DatasetScanner, ListSource
from diffmem.scan.report import write_report

HOSTILE = "a | pipe <b>bold</b> *star* [link](http://x) `code` _under_ \u202ecaption"


def test_captions_in_the_report_render_as_written(tmp_path):
    # user captions went into report.md as Markdown: "<b>" rendered bold, "[...](...)" as a link and a
    # "*" as emphasis (only "|" was escaped)
    captions = [HOSTILE] * 4 + [f"{HOSTILE} number {i}" for i in range(4)]
    res = DatasetScanner(ListSource(captions, image_keys=["same"] * 8, name="hostile <source>"), None,
                         progress=False).scan()
    path = write_report(res, tmp_path)
    html = MarkdownIt("commonmark").enable("table").render(path.read_text())
    for tag in ("<b>", "<a ", "<em>", "<strong>", "<code>", "<source>"):
        assert tag not in html, tag
    # and a right-to-left override shown by its code point, not laid out mirrored
    assert "a | pipe &lt;b&gt;bold&lt;/b&gt; *star* [link](http://x) `code` _under_ [U+202E]caption" in html
    assert "\u202e" not in html
    assert "hostile &lt;source&gt;" in html
    tables = html.split("<table>")[1:]
    assert any("example captions" in t for t in tables)  # the trigger table
    for table in tables:  # each row whole: a "|" in a caption did not end its cell
        head, body = table.split("<tbody>")
        assert all(row.count("<td>") == head.count("<th>") for row in body.split("<tr>")[1:])
