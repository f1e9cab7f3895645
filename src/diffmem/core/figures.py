"""Figures drawn without pyplot. diffmem's pictures go to files and HTML, never to a window, and
pyplot is global state: a library that set its backend (``matplotlib.use("Agg")``) would stop the
plots of a notebook that called it from showing, and its open figures would pile up in pyplot's
registry. A ``matplotlib.figure.Figure`` made directly saves itself and is freed like any object."""

from __future__ import annotations

FIGURE_OPTIONS = ("figsize", "dpi", "layout")


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """``plt.subplots`` without pyplot: ``(figure, axes)``, the figure's own options (figsize, dpi,
    layout) apart from the grid's (squeeze, sharex, gridspec_kw, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**{k: kwargs.pop(k) for k in FIGURE_OPTIONS if k in kwargs})
    FigureCanvasAgg(fig)  # this figure's own canvas (it measures text, as label placement needs), not pyplot's backend
    return fig, fig.subplots(nrows, ncols, **kwargs)
