"""What every job's report has: versions, timings, load, the JSON file, matplotlib, a printer."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import curvlinops
from curvlinops.backends._namespaces import framework_version

__all__ = ["Clock", "figure_class", "format_rows", "loadavg", "printer", "versions", "write_json"]


def versions(**packages: str) -> dict:
    """Versions of Python, the platform and the libraries (``None``: not installed).

    ``packages`` maps report keys to distribution names reported besides scipy,
    torch and jax (``sklearn="scikit-learn"``).
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "curvlinops": curvlinops.__version__,
        "numpy": np.__version__,
        "scipy": framework_version("scipy"),
        **{key: framework_version(name) for key, name in packages.items()},
        "torch": framework_version("torch"),
        "jax": framework_version("jax"),
    }


def loadavg() -> float | None:
    """The 1-minute load average, or ``None`` where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


class Clock:
    """Wall and CPU time of a job since it started, its processes' included."""

    def __init__(self) -> None:
        self.wall, self.usage, self.load_start = time.perf_counter(), os.times(), loadavg()

    def timings(self) -> dict[str, float]:
        """``wall_s``, ``cpu_user_s``, ``cpu_system_s`` (ended child processes counted)."""
        after = os.times()
        return {
            "wall_s": time.perf_counter() - self.wall,
            "cpu_user_s": after.user
            - self.usage.user
            + after.children_user
            - self.usage.children_user,
            "cpu_system_s": after.system
            - self.usage.system
            + after.children_system
            - self.usage.children_system,
        }

    def load(self) -> dict[str, Any]:
        """Cores and the load average at the start and now."""
        return {
            "cpu_count": os.cpu_count(),
            "loadavg_1min_start": self.load_start,
            "loadavg_1min_end": loadavg(),
        }

    def summary(self, timings: dict[str, float]) -> str:
        """The closing line of a job."""
        return (
            f"total: {timings['wall_s']:.1f} s wall, {timings['cpu_user_s']:.1f} s user CPU, "
            f"{timings['cpu_system_s']:.1f} s system CPU (1-min load average "
            f"{self.load_start} at the start)"
        )


def printer(quiet: bool, stream: TextIO | None) -> Callable[[str], None]:
    """A function that prints a progress line to ``stream`` (nothing when ``quiet``)."""
    stream = stream or sys.stdout
    if quiet:
        return lambda text: None
    return lambda text: print(text, file=stream, flush=True)


def write_json(report: dict, path: Path | None, stream: TextIO) -> None:
    """Write ``report`` to ``path`` (if any) and say where."""
    if path is not None:
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"JSON report: {path}", file=stream)


def figure_class(stream: TextIO) -> Any:
    """The ``Figure`` class of matplotlib (no GUI), or ``None`` after saying how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'curvlinops[plot]')", file=stream)
        return None
    return Figure


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain-text table: the first ``left`` columns left-aligned, the others right-aligned."""
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for j, cells in enumerate(lines):
        text.append(
            "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)
