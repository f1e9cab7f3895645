"""diffmem draws its pictures without pyplot: a notebook that calls it keeps its own backend."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "diffmem"

DRAW = r"""
import sys
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
