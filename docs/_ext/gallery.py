"""The gallery: every script in ``examples/`` run at build time, a page for each.

Each script runs in a process of its own (in a fresh folder, which receives the
figures it writes), as many at a time as there are cores, while Sphinx reads
the other pages. A page holds the script's docstring, what it printed, the
figures it wrote (PNG, SVG) and its source. A script that fails or runs past
``TIMEOUT_S`` fails the build. Results are kept under ``docs/_build/gallery`` and
reused while neither the script nor the library's source changed (set
``CURVLINOPS_DOCS_RERUN=1`` to run them all again); a fresh clone runs them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sphinx.errors import ExtensionError

GALLERY_DIR = "gallery"  # under the source folder; generated, not committed
TIMEOUT_S = 300
FIGURE_SUFFIXES = (".png", ".svg")


@dataclass(frozen=True)
class Run:
    """How one example is started: arguments, launcher and environment changes."""

    args: tuple[str, ...] = ()
    torchrun: int = 0  # processes under torch.distributed.run (0: plain python)
    drop_env: tuple[str, ...] = ()


# Examples that need more than ``python examples/<name>.py``; any other script
# in examples/ runs plainly. Reduced or CPU forms where the script has one.
RUNS = {
    "gpu.py": Run(args=("--dry-run",)),
    "distributed_torch.py": Run(torchrun=2),
    # the script asks XLA for 4 host devices unless XLA_FLAGS is already set
    "distributed_jax.py": Run(drop_env=("XLA_FLAGS",)),
    # the language-model example at a reduced size: the build's time budget is 2 minutes
    "influence_gpt2.py": Run(args=("--minutes", "0.2", "--passages", "96")),
}


def command(script: Path) -> list[str]:
    """The command line that runs ``script`` (see ``RUNS``)."""
    run = RUNS.get(script.name, Run())
    if run.torchrun:
        launcher = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={run.torchrun}",
        ]
        return [sys.executable, *launcher, str(script), *run.args]
    return [sys.executable, str(script), *run.args]


def environment(script: Path, root: Path) -> dict[str, str]:
    """One thread per process, a headless plot backend, this checkout's curvlinops."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    for name in RUNS.get(script.name, Run()).drop_env:
        env.pop(name, None)
    return env


def _run_once(script: Path, folder: Path, root: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            command(script),
            cwd=folder / "files",
            env=environment(script, root),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as error:
        raise ExtensionError(f"examples/{script.name} ran past {TIMEOUT_S} s: {error}") from None


def fingerprint(script: Path, root: Path) -> str:
    """A hash of the script, its command line and the library's source."""
    digest = hashlib.sha256(script.read_bytes())
    digest.update(json.dumps(command(script)[1:]).encode())
    for path in sorted((root / "curvlinops").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_example(script: Path, root: Path, cache: Path) -> dict:
    """Run ``script`` (or reuse its kept result); returns its record, raises if it failed."""
    folder = cache / script.stem
    stamp = fingerprint(script, root)
    record_path = folder / "record.json"
    if record_path.exists() and not os.environ.get("CURVLINOPS_DOCS_RERUN"):
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == stamp:
            return {**record, "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "files").mkdir(parents=True)
    start = time.perf_counter()
    done = _run_once(script, folder, root)
    if done.returncode != 0 and RUNS.get(script.name, Run()).torchrun:
        # torchrun's ranks sometimes abort at exit ("terminate called without an active
        # exception", gloo's threads torn down): one rerun before the build fails
        done = _run_once(script, folder, root)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise ExtensionError(
            f"examples/{script.name} failed (exit status {done.returncode}); "
            f"stderr:\n{done.stderr[-4000:]}"
        )
    figures = sorted(
        str(p.relative_to(folder))
        for p in (folder / "files").rglob("*")
        if p.suffix in FIGURE_SUFFIXES
    )
    record = {"fingerprint": stamp, "seconds": round(seconds, 1), "figures": figures}
    (folder / "stdout.txt").write_text(done.stdout, encoding="utf-8")
    record_path.write_text(json.dumps(record))
    return {**record, "reused": False}


def docstring_parts(script: Path) -> tuple[str, str]:
    """The script's title (first docstring line) and the rest of its docstring."""
    import ast

    doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or script.stem
    title, _, body = doc.partition("\n")
    return title.strip().rstrip("."), fenced_commands(body.strip("\n")).strip()


def fenced_commands(text: str) -> str:
    """``text`` with its indented lines (the scripts' command lines) as shell code blocks."""
    blocks = re.split(r"\n\s*\n", text)
    for i, block in enumerate(blocks):
        lines = block.splitlines()
        if lines and all(line.startswith("    ") for line in lines):
            blocks[i] = "```bash\n" + "\n".join(line[4:] for line in lines) + "\n```"
    return "\n\n".join(blocks)


def page_text(script: Path, record: dict, cache_rel: str) -> str:
    """The MyST source of one example's page."""
    title, body = docstring_parts(script)
    run = " ".join(command(script)[1:]).replace(str(script), f"examples/{script.name}")
    lines = [
        f"(gallery-{script.stem})=",
        f"# {title}",
        "",
        body,
        "",
        f"Run as `python {run}` at this build"
        + (" (result kept from an earlier build of the same source)" if record["reused"] else "")
        + f"; it took {record['seconds']:.1f} s on the build machine.",
        "",
        "## Output",
        "",
        f"```{{literalinclude}} /{cache_rel}/{script.stem}/stdout.txt",
        ":language: text",
        "```",
        "",
    ]
    if record["figures"]:
        lines += ["## Figures", ""]
        for figure in record["figures"]:
            lines += [
                f"```{{image}} /{cache_rel}/{script.stem}/{figure}",
                f":alt: {Path(figure).stem.replace('_', ' ')} ({script.name})",
                "```",
                "",
            ]
    lines += [
        "## Source",
        "",
        f"```{{literalinclude}} /../examples/{script.name}",
        ":language: python",
        "```",
        "",
    ]
    return "\n".join(lines)


def index_text(scripts: list[Path]) -> str:
    """The gallery's front page: one entry per example."""
    lines = [
        "# Gallery",
        "",
        "The scripts in `examples/`, each run when these pages were built: their "
        "output and figures below are from that run. A script that fails fails the build.",
        "",
        "| example | what it shows |",
        "| --- | --- |",
    ]
    for script in scripts:
        title, _ = docstring_parts(script)
        lines.append(f"| [`{script.name}`]({script.stem}.md) | {title} |")
    lines += ["", "```{toctree}", ":hidden:", "", *(s.stem for s in scripts), "```", ""]
    return "\n".join(lines)


class Gallery:
    """Starts the examples when the build starts; each page waits for its own."""

    def __init__(self, app):
        self.root = Path(app.srcdir).parent
        self.out = Path(app.srcdir) / GALLERY_DIR
        self.cache = Path(app.srcdir) / "_build" / "gallery"
        self.scripts = sorted((self.root / "examples").glob("*.py"))
        self.pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
        self.futures: dict[str, Future] = {}

    def start(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        (self.out / "index.md").write_text(index_text(self.scripts), encoding="utf-8")
        for script in self.scripts:
            # placeholder until the run is done: Sphinx must see the page now
            (self.out / f"{script.stem}.md").write_text(f"# {script.stem}\n", encoding="utf-8")
        for script in sorted(self.scripts, key=self.expected_seconds, reverse=True):
            self.futures[script.stem] = self.pool.submit(run_example, script, self.root, self.cache)

    def expected_seconds(self, script: Path) -> float:
        """The last run's time, else the script's size: the longest start first."""
        record = self.cache / script.stem / "record.json"
        if record.exists():
            return json.loads(record.read_text())["seconds"]
        return script.stat().st_size / 100

    def source(self, docname: str) -> str | None:
        """The page for ``docname`` once its example has run, or None if not an example."""
        stem = docname.removeprefix(f"{GALLERY_DIR}/")
        if not docname.startswith(f"{GALLERY_DIR}/") or stem not in self.futures:
            return None
        record = self.futures[stem].result()
        script = self.root / "examples" / f"{stem}.py"
        text = page_text(script, record, "_build/gallery")
        (self.out / f"{stem}.md").write_text(text, encoding="utf-8")
        return text

    def wait_all(self) -> list[tuple[str, dict]]:
        results = [(stem, future.result()) for stem, future in self.futures.items()]
        self.pool.shutdown()
        return results


def _builder_inited(app) -> None:
    app.env.curvlinops_gallery = None
    gallery = Gallery(app)
    gallery.start()
    app._curvlinops_gallery = gallery


def _source_read(app, docname, source) -> None:
    text = app._curvlinops_gallery.source(docname)
    if text is not None:
        source[0] = text


def _env_updated(app, env) -> list[str]:
    from sphinx.util import logging

    runs = app._curvlinops_gallery.wait_all()
    ran = [f"{stem} {record['seconds']:.0f}s" for stem, record in runs if not record["reused"]]
    kept = [stem for stem, record in runs if record["reused"]]
    logging.getLogger(__name__).info(
        "gallery: ran %s; kept %s", ", ".join(ran) or "none", ", ".join(kept) or "none"
    )
    return []


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("source-read", _source_read)
    app.connect("env-updated", _env_updated)
    return {"parallel_read_safe": False, "parallel_write_safe": True}


__all__ = ["RUNS", "command", "run_example", "setup"]
