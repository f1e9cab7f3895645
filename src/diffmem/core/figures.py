"""Figures drawn without pyplot. diffmem's pictures go to files and HTML, never to a window, and
pyplot is global state: a library that set its backend (``matplotlib.use("Agg")``) would stop the
plots of a notebook that called it from showing, and its open figures would pile up in pyplot's
registry. A ``matplotlib.figure.Figure`` made directly saves itself and is freed like any object.

The figures draw prompts, captions and words as they were written: a pair of dollar signs ("a $5
bill and a $10 note") is not read as TeX math, which would set the words between in italics or stop
the drawing with a parse error, characters the default font lacks (Chinese, Japanese, ...) are
drawn with an installed font that has them, where there is one, and bidirectional formatting
characters are shown by code point, as in the HTML pages: matplotlib lays text out with libraqm,
and a right-to-left override in a prompt drew the rest of a chart's title mirrored."""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
import warnings
from contextlib import contextmanager

# imported with this module, which only drawing code imports (inside its functions): the command line
# starts without matplotlib
import matplotlib
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from matplotlib.text import Text
from matplotlib.ticker import LogFormatterMathtext, LogFormatterSciNotation

from .prompts import reveal_bidi_controls

FIGURE_OPTIONS = ("figsize", "dpi", "layout")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``plt.subplots`` without pyplot: ``(figure, axes)``, the figure's own options (figsize, dpi,
    layout) apart from the grid's (squeeze, sharex, gridspec_kw, ...)."""
    fig = PlainTextFigure(**{k: kwargs.pop(k) for k in FIGURE_OPTIONS if k in kwargs})
    FigureCanvasAgg(fig)  # this figure's own canvas (it measures text, as label placement needs), not pyplot's backend
    return fig, fig.subplots(nrows, ncols, **kwargs)


class PlainTextFigure(Figure):
    """A ``Figure`` that draws its text as written (see above). Made at module level, not per call,
    so that its figures pickle like any matplotlib figure."""

    @contextmanager
    def _as_written(self):
        _plain_log_ticks(self)
        uncovered: set[str] = set()
        for text in self.findobj(Text):
            text.set_parse_math(False)
            uncovered |= _add_fallback_fonts(text)
        _warn_uncovered(uncovered - _WARNED)
        # texts made while laying out or drawing (tick labels) are plain too; matplotlib's own
        # warning per missing glyph gives way to the one above, and its log line when a fallback
        # font has no regular weight ("now using 500") to the nearest weight it then uses
        font_log = logging.getLogger("matplotlib.font_manager")
        level = font_log.level
        font_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), matplotlib.rc_context({"text.parse_math": False}):
                warnings.filterwarnings("ignore", r"Glyph \d+ .* missing from font")
                yield
        finally:
            font_log.setLevel(level)

    def draw(self, renderer):
        with self._as_written():
            return super().draw(renderer)

    def tight_layout(self, *args, **kwargs):
        with self._as_written():
            return super().tight_layout(*args, **kwargs)


_SUPERSCRIPTS = str.maketrans("0123456789-\u2212.", "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079\u207b\u207b\u00b7")


def plain_math(label: str) -> str:
    """A log axis' tick label as plain text: matplotlib writes them in TeX math ("$\\mathdefault{10^{-2}}$"),
    which a figure drawing its text as written would show raw; "10⁻²", "6×10⁰" and "0" read the same."""
    if not (len(label) > 1 and label[0] == label[-1] == "$"):
        return label
    inner = label[1:-1]
    if inner.startswith("\\mathdefault{") and inner.endswith("}"):
        inner = inner[len("\\mathdefault{"):-1]
    inner = inner.replace("\\times", "\u00d7").replace("\\;", " ")
    return re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(_SUPERSCRIPTS), inner)


class PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's log-axis labels (decades, and the minor ticks' "6×10⁰"), in plain text."""

    def __call__(self, x, pos=None):
        return plain_math(super().__call__(x, pos))


def _plain_log_ticks(fig) -> None:
    """Give the log and symlog axes of ``fig`` plain-text tick labels: the labels matplotlib makes
    for them are TeX math, which these figures do not parse."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for get, put in ((axis.get_major_formatter, axis.set_major_formatter),
                             (axis.get_minor_formatter, axis.set_minor_formatter)):
                fmt = get()
                if isinstance(fmt, LogFormatterMathtext) and not isinstance(fmt, PlainLogFormatter):
                    put(PlainLogFormatter(fmt._base, labelOnlyBase=fmt.labelOnlyBase, minor_thresholds=fmt.minor_thresholds,
                                          linthresh=fmt._linthresh))


def _shown_in_plain_figures(preprocess):
    """``Text._preprocess_math``, through which every line of a text passes on its way to layout and
    drawing, with bidi controls shown for the texts of diffmem's figures only. Patched on the class,
    not per text, because tick labels are made and set while a figure draws."""
    if getattr(preprocess, "diffmem_plain", False):  # this module imported again
        return preprocess

    @functools.wraps(preprocess)
    def shown(self, s):
        if isinstance(self.figure, PlainTextFigure):
            s = reveal_bidi_controls(s)
        return preprocess(self, s)

    shown.diffmem_plain = True
    return shown


# a private method of matplotlib's: a version without it draws the controls as they act, and still draws
if hasattr(Text, "_preprocess_math"):
    Text._preprocess_math = _shown_in_plain_figures(Text._preprocess_math)

_WARNED: set[str] = set()  # characters already warned of in this process: a profile draws a figure a prompt


def _warn_uncovered(chars: set[str]) -> None:
    if chars:
        _WARNED.update(chars)
        warnings.warn(f"no font on this machine has {''.join(sorted(chars))!r}: drawn as boxes; install a font that "
                      "has them (Noto Sans CJK, for Chinese and Japanese) and diffmem uses it")


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # an unreadable font file covers nothing
        return frozenset()


def _font_path(family: str, prop) -> str | None:
    p = prop.copy()
    p.set_family(family)
    try:
        return font_manager.fontManager.findfont(p, fallback_to_default=False)
    except ValueError:
        return None


def _drawable(ch: str) -> bool:
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")


def _add_fallback_fonts(text) -> set[str]:
    """Append to ``text``'s font families installed fonts that have the characters its fonts lack;
    returns the characters no installed font has."""
    s = text.get_text()
    if s.isascii():
        return set()
    prop = text.get_fontproperties()
    families = list(prop.get_family())
    fonts = [_charmap(p) for f in families if (p := _font_path(f, prop)) is not None]
    missing = {ch for ch in s if _drawable(ch) and not any(ord(ch) in font for font in fonts)}
    if not missing:
        return set()
    added, uncovered = _covering_fonts(missing, families)
    if not added:  # none that matplotlib lists: perhaps one installed since it cached its list
        _list_new_system_fonts(missing)
        added, uncovered = _covering_fonts(missing, families)
    if added:
        text.set_fontfamily(families + added)
    return uncovered


def _covering_fonts(missing: set[str], families: list[str]) -> tuple[list[str], set[str]]:
    """Families of listed fonts, first fit, that together have as many of ``missing`` as any do,
    and the characters none has."""
    added, missing = [], set(missing)
    for name, path in _installed_fonts():
        has = {ch for ch in missing if ord(ch) in _charmap(path)}
        if has and name not in families + added:
            added.append(name)
            missing -= has
        if not missing:
            break
    return added, missing


def _has_any(path: str, chars: set[str]) -> bool:
    return not _charmap(path).isdisjoint(ord(ch) for ch in chars)


_LOOKED_FOR: set[str] = set()  # characters already looked for among the system's fonts


def _list_new_system_fonts(missing: set[str]) -> None:
    """Add to matplotlib's font list, for this process, the system fonts installed since matplotlib
    cached that list (it is read from its cache, never refreshed) that have any of ``missing``: a
    user told to install a font for them gets it used without deleting matplotlib's cache."""
    if missing <= _LOOKED_FOR:
        return
    _LOOKED_FOR.update(missing)
    listed = {e.fname for e in font_manager.fontManager.ttflist}
    for path in font_manager.findSystemFonts(fontext="ttf"):
        if path not in listed and _has_any(path, missing):
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):  # a font matplotlib cannot read covers nothing
                continue


def _installed_fonts() -> list[tuple[str, str]]:
    """(family name, file) of every font matplotlib knows, upright regular weights first. Not "Last
    Resort" (matplotlib ships one): its glyphs are placeholder boxes for whole Unicode blocks."""
    entries = sorted((e for e in font_manager.fontManager.ttflist if not e.name.startswith("Last Resort")),
                     key=lambda e: (e.style != "normal", abs(_weight(e.weight) - 400), e.name, e.fname))
    return [(e.name, e.fname) for e in entries]


def _weight(weight) -> int:
    return weight if isinstance(weight, int) else font_manager.weight_dict.get(weight, 400)
