"""This process's peak resident memory, for the benchmark scripts' memory figures.

``getrusage``'s ``ru_maxrss`` survives ``exec``: a benchmark's fresh child process, started by a
parent that had loaded a model or written a dataset, reported the parent's peak as its own until it
passed it, which hid the child's own use. Linux's ``VmHWM`` is the process's own from its ``exec``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # elsewhere ru_maxrss, which a child may inherit from its parent: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


__all__ = ["peak_rss_mb"]
