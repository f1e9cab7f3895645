"""The scan's short report: a Markdown page (summary, trigger phrases with their captions, caption
groups) and a PNG of the largest image clusters."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.prompts import reveal_bidi_controls
from ..core.results import atomic_write_text


_MARKDOWN = str.maketrans({**{c: "\\" + c for c in "\\`*[]|~"}, "&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": " ",
                           "\r": " "})
_EMPHASIS_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")  # "file_name" stays as it is


def _cell(text) -> str:
    """Captions and paths are user data: shown as written, never read as Markdown or HTML (a "<b>", a
    "[link](...)" or a "|" that would end the table cell), and their bidirectional formatting
    characters shown by code point, as in the HTML pages (a viewer would reorder the text after them)."""
    return _EMPHASIS_UNDERSCORE.sub(r"\\_", reveal_bidi_controls(str(text)).translate(_MARKDOWN))


def write_report(result, folder: str | Path, thumbs=None, max_phrases: int = 30) -> Path:
    folder = Path(folder)
    lines = ["# diffmem scan", "", f"source: {_cell(result.source)}", "", "| check | rows flagged | detail |",
             "|---|---|---|"]
    for rec in result.summary.to_dict("records"):
        lines.append(f"| {rec['check']} | {rec['issues']} | {_cell(rec['detail'])} |")
    trig = result.info.get("triggers", [])
    lines += ["", f"## Trigger phrases ({len(trig)})", ""]
    if trig:
        lines += ["| phrase | cluster | support | in cluster | purity | example captions |", "|---|---|---|---|---|---|"]
        for t in trig[:max_phrases]:
            ex = "<br>".join(_cell(c) for c in t["examples"][:3])
            lines.append(f"| {_cell(t['phrase'])} | {t['cluster']} | {t['support']} | {t['in_cluster']} | "
                         f"{t['purity']:.2f} | {ex} |")
    shared = result.info.get("shared_phrases", [])
    if shared:
        lines += ["", f"## Shared phrases and their image host ({len(shared)}; no images compared)", "",
                  "| phrase | captions | from one host | host | example captions |", "|---|---|---|---|---|"]
        for t in shared[:max_phrases]:
            ex = "<br>".join(_cell(c) for c in t["examples"][:3])
            lines.append(f"| {_cell(t['phrase'])} | {t['support']} | {t['in_cluster']} | {_cell(t['host'])} | {ex} |")
    for kind, groups in result.info.get("caption_groups", {}).items():
        lines += ["", f"## Caption groups: {kind} (largest {len(groups)})", ""]
        for g in groups[:10]:
            lines.append(f"- {g['size']} rows: " + " / ".join(f"“{_cell(c)}”" for c in g["example_captions"]))
    clusters = result.info.get("image_clusters", [])
    if clusters:
        png = result.plot_clusters(folder / "clusters.png", thumbs)
        lines += ["", f"## Image clusters ({len(clusters)})", ""]
        if png is not None:
            lines += ["![largest image clusters](clusters.png)", ""]
        for c in clusters[:10]:
            # where the copies are, so the curator can drop them (a result saved before rows had locations has none)
            found = [x for x in c.get("example_locations", []) if isinstance(x, str)]
            where = f"; images: {', '.join(_cell(x) for x in found)}{', ...' if c['size'] > len(found) else ''}" if found else ""
            lines.append(f"- cluster {c['cluster']}: {c['size']} rows, e.g. " +
                         " / ".join(f"“{_cell(x)}”" for x in c["example_captions"]) + where)
    if "memorization_score" in result.rows:
        png = _plot_memorization(result, folder / "memorization.png")
        thr = result.summary.set_index("check").loc["memorization", "detail"].get("threshold")
        flagged = result.rows[result.rows["is_memorization_issue"]].sort_values("memorization_score", ascending=False)
        lines += ["", f"## Per-sample memorization score ({len(flagged)} rows above {thr:.3f})" if thr is not None
                  else "## Per-sample memorization score", "", "![noise-norm distribution](memorization.png)", ""]
        for rec in flagged.head(15).to_dict("records"):
            lines.append(f"- row {rec['row']}: {rec['memorization_score']:.3f} “{_cell(rec['caption'])}”")
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plot_memorization(result, path: Path) -> Path:
    from ..core.figures import subplots
    import numpy as np

    s = result.rows["memorization_score"].to_numpy(float)
    s = s[np.isfinite(s)]
    thr = result.summary.set_index("check").loc["memorization", "detail"].get("threshold")
    fig, ax = subplots(figsize=(6, 3))
    ax.hist(s, bins=60, color="#4c72b0")
    if thr is not None:
        ax.axvline(thr, color="crimson", linestyle="--", label=f"threshold {thr:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("text-conditional noise norm of the training pair")
    ax.set_ylabel("rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
