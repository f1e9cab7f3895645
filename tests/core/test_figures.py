"""diffmem draws its pictures without pyplot: a notebook that calls it keeps its own backend."""

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "diffmem"

DRAW = r"""
import sys

import pytest
import matplotlib
matplotlib.use("svg")  # stands for a notebook's inline backend
import numpy as np
from pathlib import Path
out = Path(sys.argv[1])
from diffmem.detect.plot import score_figure
from diffmem.mitigate import MitigationResult
from diffmem.train.plot import plot_training
from diffmem.report.html import _roc_figure

score_figure(np.linspace(0, 1, 20), 0.5).savefig(out / "scores.png")
imgs = np.zeros((2, 1, 8, 8, 3), np.float32)
res = MitigationResult("rna", ["a", "b"], {"seed": 0}, [0], np.ones(2), np.ones(2), [[1.0, 0.5], [1.0]],
                       np.zeros(2, int), np.ones(2, bool), ["a 1", "b 2"], images_before=imgs, images_after=imgs)
res.plot_grid(out / "grid.png")
res.plot_trajectories(out / "loss.png")
plot_training([{"step": 0, "loss": 1.0}, {"step": 50, "loss": 0.5}], [{"epoch": 1, "samples": 4, "dropped": 1}],
              out / "training.png")
_roc_figure({"fpr": [0, 0.5, 1], "tpr": [0, 0.9, 1]}, "roc")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_drawing_leaves_the_callers_matplotlib_backend_and_pyplot_alone(tmp_path):
    r = subprocess.run([sys.executable, "-c", DRAW, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["svg", "False"]  # the backend as set, pyplot never imported
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("scores.png", "grid.png", "loss.png", "training.png"))


def test_no_module_sets_the_backend_or_uses_pyplot():
    import re

    # the figures above are a sample; every drawing goes through core.figures.subplots
    code = re.compile(r"^\s*(import matplotlib\.pyplot|from matplotlib import pyplot|matplotlib\.use\()", re.M)
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if code.search(p.read_text())]
    assert offenders == [], offenders


def _dark_pixels(fig) -> int:
    import numpy as np

    fig.canvas.draw()
    return int((np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(-1) < 100).sum())


def _plain_matplotlib_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 2))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def test_dollar_signs_in_a_prompt_are_drawn_as_written_not_read_as_tex():
    # "a $5 bill and a $10 note" set "5 bill and a " in TeX italics, and "a $_$ sign" stopped the drawing
    # with a parse error (tight_layout measures the text first)
    import numpy as np

    from diffmem.core.figures import subplots

    for prompt in ("a $5 bill and a $10 note", "a $_$ sign", r"price $\frac$ off"):
        fig, ax = subplots(figsize=(4, 2))
        ax.set_title(prompt)
        ax.set_xticks([0, 1], [prompt, "x"])
        fig.tight_layout()
        fig.canvas.draw()
        # the same pixels as matplotlib's own figure given the text with its dollars escaped
        ref, ref_ax = _plain_matplotlib_figure()
        ref_ax.set_title(prompt.replace("$", r"\$"))
        ref_ax.set_xticks([0, 1], [prompt.replace("$", r"\$"), "x"])
        ref.tight_layout()
        ref.canvas.draw()
        np.testing.assert_array_equal(np.asarray(fig.canvas.buffer_rgba()), np.asarray(ref.canvas.buffer_rgba()))
    plain, plain_ax = _plain_matplotlib_figure()
    plain_ax.set_title("a $_$ sign")
    with pytest.raises(ValueError):  # what the figures did before
        plain.tight_layout()


def test_a_right_to_left_override_in_a_prompt_is_shown_not_obeyed():
    # matplotlib lays text out with libraqm: "a red \u202ecircle on a square" was titled
    # "a red erauqs a no elcric", and a tick label holding the override drew mirrored
    import numpy as np

    from diffmem.core.figures import subplots

    prompt = "a red \u202ecircle on a square"
    fig, ax = subplots(figsize=(4, 2))
    ax.set_title(prompt)
    ax.set_xticks([0, 1], ["\u202ecircle", "x"])  # tick labels are set while the figure draws
    fig.tight_layout()
    fig.canvas.draw()
    ref, ref_ax = _plain_matplotlib_figure()
    ref_ax.set_title("a red [U+202E]circle on a square")
    ref_ax.set_xticks([0, 1], ["[U+202E]circle", "x"])
    ref.tight_layout()
    ref.canvas.draw()
    np.testing.assert_array_equal(np.asarray(fig.canvas.buffer_rgba()), np.asarray(ref.canvas.buffer_rgba()))
    assert ax.title.get_text() == prompt  # the figure's text keeps the character; only its drawing shows it
    # a figure of the caller's own is drawn as matplotlib draws it
    plain, plain_ax = _plain_matplotlib_figure()
    assert plain_ax.title._preprocess_math(prompt) == (prompt, False)


def _write_cat_glyph_font(path: Path) -> str:
    """A font with one glyph, a filled square, for U+732B (猫); returns its family name."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def square(filled: bool):
        pen = TTGlyphPen(None)
        if filled:
            pen.moveTo((0, -100)), pen.lineTo((0, 800)), pen.lineTo((900, 800)), pen.lineTo((900, -100))
            pen.closePath()
        return pen.glyph()

    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder([".notdef", "cat"])
    fb.setupCharacterMap({0x732B: "cat"})
    fb.setupGlyf({".notdef": square(False), "cat": square(True)})
    fb.setupHorizontalMetrics({".notdef": (500, 0), "cat": (1000, 0)})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "DiffmemTestGlyphs", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))
    return "DiffmemTestGlyphs"


@pytest.fixture
def font_list():
    """matplotlib's list of fonts, as it was before the test once the test ends."""
    from matplotlib import font_manager

    before = list(font_manager.fontManager.ttflist)
    yield font_manager.fontManager
    font_manager.fontManager.ttflist[:] = before


@pytest.mark.parametrize("listed", [True, False])
def test_characters_the_default_font_lacks_are_drawn_with_an_installed_font_that_has_them(tmp_path, font_list,
                                                                                          monkeypatch, listed):
    import warnings

    from matplotlib import font_manager

    from diffmem.core import figures

    path = str(tmp_path / "test_glyphs.ttf")
    family = _write_cat_glyph_font(Path(path))
    if listed:
        font_list.addfont(path)
    else:  # installed after matplotlib cached its list of fonts, which it reads from that cache ever after
        monkeypatch.setattr(font_manager, "findSystemFonts", lambda *args, **kwargs: [path])
        monkeypatch.setattr(figures, "_LOOKED_FOR", set())
    fig, ax = figures.subplots(figsize=(4, 2))
    ax.axis("off")
    text = ax.text(0.5, 0.5, "猫 cat", fontsize=40, ha="center", va="center")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drawn = _dark_pixels(fig)
    assert family in text.get_fontfamily() and not caught
    # the font's filled square, not the default font's hollow box for a missing glyph
    boxed, boxed_ax = _plain_matplotlib_figure()
    boxed_ax.axis("off")
    boxed_ax.text(0.5, 0.5, "猫 cat", fontsize=40, ha="center", va="center")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert drawn > _dark_pixels(boxed) + 1000


def test_characters_no_installed_font_has_are_warned_of_once_not_per_glyph(monkeypatch):
    import warnings

    from diffmem.core import figures

    monkeypatch.setattr(figures, "_WARNED", set())
    monkeypatch.setattr(figures, "_LOOKED_FOR", set())
    lacking = "\u0378\u0379"  # not assigned in Unicode: no font has them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a profile draws a figure per prompt
            fig, ax = figures.subplots(figsize=(4, 2))
            ax.set_title(f"a {lacking} sign")
            fig.tight_layout()
            fig.canvas.draw()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no font on this machine has" in messages[0], messages
    assert repr(lacking) in messages[0]  # the characters themselves, escaped where unprintable


def test_a_figure_pickles_like_any_matplotlib_figure():
    import pickle

    from diffmem.core.figures import subplots

    fig, ax = subplots(figsize=(3, 2))
    ax.set_title("a $5 bill")
    back = pickle.loads(pickle.dumps(fig))
    assert back.axes[0].get_title() == "a $5 bill" and type(back).__name__ == "PlainTextFigure"


def test_log_axes_label_their_ticks_in_plain_text_not_raw_tex():
    # matplotlib labels log and symlog ticks in TeX math; with math parsing off for the prompts' sake, the
    # detect histograms and ROC plots showed "$\mathdefault{10^{0}}$" on their axes
    import numpy as np

    from diffmem.core.figures import subplots

    fig, (hist, roc) = subplots(1, 2, figsize=(6, 2))
    hist.hist(np.linspace(0, 3, 200) ** 2, bins=20)
    hist.set_yscale("log")
    roc.plot([0, 0.001, 0.01, 0.1, 1], [0, 1, 2, 3, 4])
    roc.set_xscale("symlog", linthresh=0.01)
    fig.tight_layout()
    fig.canvas.draw()
    labels = [t.get_text() for ax in (hist, roc) for axis in (ax.xaxis, ax.yaxis) for minor in (False, True)
              for t in axis.get_ticklabels(minor=minor)]
    assert not [label for label in labels if "$" in label or "\\" in label], labels
    assert {"10\u2070", "10\u00b9"} <= {t.get_text() for t in hist.get_yticklabels()}
    assert [t.get_text() for t in roc.get_xticklabels()][:3] == ["0", "10\u207b\u00b2", "10\u207b\u00b9"]
