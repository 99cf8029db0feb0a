"""The documentation's generators, without building the site (docs/_ext/).

The API reference (apipages.py): every name of the public ``__all__`` lists gets a
page with an autodoc directive for it, and a docstring for it to show. The gallery
(gallery.py): a script's output and figures are kept, and a failing script fails
the build. The getting-started guides' code runs as a reader would paste it. The
built site itself is checked by docs/test_site.py (after the build, in .ci/run).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
pytest.importorskip("sphinx", reason="the docs extra is not installed")


def _extension(name: str):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS / "_ext"))


@pytest.fixture(scope="module")
def apipages():
    return _extension("apipages")


@pytest.fixture(scope="module")
def gallery():
    return _extension("gallery")


def public_names() -> list[str]:
    """Every public name, read here independently of the generator."""
    import curvlinops
    import curvlinops.backends

    names = []
    for name in curvlinops.__all__:
        obj = getattr(curvlinops, name)
        if isinstance(obj, types.ModuleType):
            names += [f"{obj.__name__}.{n}" for n in obj.__all__]
        else:
            names.append(f"curvlinops.{name}")
    names += [f"curvlinops.backends.{n}" for n in curvlinops.backends.__all__]
    names += [
        f"curvlinops.__main__.{n}" for n in importlib.import_module("curvlinops.__main__").__all__
    ]
    return names


def test_every_public_name_gets_a_page(apipages, tmp_path):
    written = apipages.write_api_pages(tmp_path)
    missing = [name for name in public_names() if name not in written]
    assert not missing, f"public names without a page: {missing}"
    for name in public_names():
        text = written[name].read_text()
        assert f":: {name}" in text, text  # the autodoc (or py:data) directive names it
    index = (tmp_path / "index.rst").read_text()
    assert all(f"<{name}>" in index for name in written)  # and the front page links it


def test_the_jobs_entry_points_are_found(apipages):
    section = apipages.job_section()
    assert "curvlinops.__main__.main" in section.names
    assert any(name.endswith(".run_demo") for name in section.names)
    assert any(name.endswith(".run_influence_study") for name in section.names)


def test_every_documented_callable_and_class_has_a_docstring(apipages):
    undocumented = []
    for section in apipages.public_sections():
        for name in section.names:
            full, obj = apipages.resolve(section, name)
            if (inspect.isclass(obj) or callable(obj)) and not inspect.getdoc(obj):
                undocumented.append(full)
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_a_name_added_to_all_gets_a_page(apipages, tmp_path, monkeypatch):
    import curvlinops

    def brand_new_function():
        """A function that only this test exports."""

    monkeypatch.setattr(curvlinops, "brand_new_function", brand_new_function, raising=False)
    monkeypatch.setattr(curvlinops, "__all__", [*curvlinops.__all__, "brand_new_function"])
    written = apipages.write_api_pages(tmp_path)
    assert (
        ".. autofunction:: curvlinops.brand_new_function"
        in written["curvlinops.brand_new_function"].read_text()
    )


SCRIPT_WITH_A_FIGURE = """\"\"\"A figure.

    python examples/figure.py

Writes a one-pixel PNG.
\"\"\"
import struct, zlib
print("hello from the example")
row = b"\\x00" + b"\\xff\\x00\\x00"
raw = zlib.compress(row)
def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
png = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
open("dot.png", "wb").write(png + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
"""


def test_an_example_s_output_and_figures_are_kept(gallery, tmp_path):
    script = tmp_path / "figure.py"
    script.write_text(SCRIPT_WITH_A_FIGURE)
    root = Path(__file__).resolve().parents[1]
    record = gallery.run_example(script, root, tmp_path / "cache")
    assert record["figures"] == ["files/dot.png"] and not record["reused"]
    assert (tmp_path / "cache" / "figure" / "stdout.txt").read_text() == "hello from the example\n"
    page = gallery.page_text(script, record, "_build/gallery")
    assert "```bash\npython examples/figure.py\n```" in page  # the usage line as a shell block
    assert "/_build/gallery/figure/files/dot.png" in page and "stdout.txt" in page
    assert gallery.run_example(script, root, tmp_path / "cache")["reused"]  # same source: kept


def test_a_failing_example_fails_the_build(gallery, tmp_path):
    from sphinx.errors import ExtensionError

    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit('this example is broken')\n")
    root = Path(__file__).resolve().parents[1]
    expected = "(?s)examples/broken.py failed.*this example is broken"
    with pytest.raises(ExtensionError, match=expected):
        gallery.run_example(script, root, tmp_path / "cache")


# Guides whose code blocks run top to bottom as a reader would paste them.
RUNNABLE_GUIDES = ["getting-started-pytorch.md", "getting-started-jax.md"]

RUN_GUIDES = """
import importlib.util, json, re, sys
for path in json.loads(sys.argv[1]):
    text = open(path, encoding="utf-8").read()
    namespace = {}
    for block in re.findall(r"```python\\n(.*?)```", text, re.S):
        needs = re.findall(r"^import (\\w+)|^from (\\w+)", block, re.M)
        if any(importlib.util.find_spec(a or b) is None for a, b in needs):
            print(f"{path}: skipped a block that needs a package not installed")
            continue
        exec(compile(block, path, "exec"), namespace)
    print(f"{path}: ran")
"""


def test_the_getting_started_guides_run():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import json
    import os
    import subprocess

    paths = [str(DOCS / "guide" / name) for name in RUNNABLE_GUIDES]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_GUIDES, json.dumps(paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(": ran") == len(paths), done.stdout
