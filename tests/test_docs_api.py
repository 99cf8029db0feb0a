"""The API reference's generator (docs/_ext/apipages.py): a page for every public name.

The built site is checked by docs/test_site.py (after the build, in .ci/run); this
runs without Sphinx building anything: the generator writes its reST pages into a
temporary folder, and every name of the public ``__all__`` lists must have one,
with an autodoc directive for it, and a docstring for it to show.
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


@pytest.fixture(scope="module")
def apipages():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        yield importlib.import_module("apipages")
    finally:
        sys.path.remove(str(DOCS / "_ext"))


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
