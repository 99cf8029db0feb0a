"""The benchmark page, generated from ``benchmarks/latest`` at build time.

Each run folder there (``float32``, ``gpt2-small``, ...) becomes a section with
its Markdown tables (headings moved one level down) and its plots, so that a new
run folder appears without editing the docs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

PAGE = "benchmarks/results"  # docname under the source folder; generated


def demoted(markdown: str, top: int) -> str:
    """``markdown`` with its headings shifted so that the highest is of level ``top``."""
    heading = re.compile(r"(#{1,6}) ")
    fenced, levels = False, []
    for line in markdown.splitlines():
        fenced = fenced != line.startswith("```")
        if not fenced and (match := heading.match(line)):
            levels.append(len(match.group(1)))
    shift = top - min(levels, default=top)
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced = fenced != line.startswith("```")
        if not fenced and heading.match(line):
            line = "#" * shift + line if shift >= 0 else line[-shift:]
        lines.append(line)
    return "\n".join(lines)


def page_text(latest: Path, figures: Path) -> str:
    """The MyST source of the results page; copies the plots into ``figures``."""
    lines = [
        "# Benchmark results",
        "",
        "The latest runs of `python -m benchmarks`, as kept in `benchmarks/latest/` "
        "(the method and the targets are in [Benchmarks](index.md)). Each section is "
        "one run folder: its tables as the run wrote them, then its plots.",
        "",
    ]
    for run in sorted(p for p in latest.iterdir() if p.is_dir()):
        lines += [f"## {run.name}", ""]
        tables = sorted(run.glob("*.md"))
        for table in tables:
            text = table.read_text(encoding="utf-8")
            first, _, rest = text.partition("\n")
            if first.startswith("#"):  # the run's own title: the section has one
                text = rest
            if len(tables) > 1:
                lines += [f"### {table.stem}", ""]
            lines += [demoted(text, 4 if len(tables) > 1 else 3), ""]
        for plot in sorted(run.glob("*.png")):
            target = figures / f"{run.name}-{plot.name}"
            shutil.copyfile(plot, target)
            lines += [
                f"```{{image}} {figures.name}/{target.name}",
                f":alt: {run.name}: {plot.stem.replace('_', ' ')}",
                "```",
                "",
            ]
    return "\n".join(lines)


def _builder_inited(app) -> None:
    source = Path(app.srcdir)
    page = source / f"{PAGE}.md"
    figures = page.parent / "figures"
    shutil.rmtree(figures, ignore_errors=True)
    figures.mkdir(parents=True)
    page.write_text(page_text(source.parent / "benchmarks" / "latest", figures), encoding="utf-8")


def setup(app):
    app.connect("builder-inited", _builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
