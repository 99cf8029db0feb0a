"""Sphinx configuration: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

Sphinx, because the docstrings are Google-style with reStructuredText inside
(``:math:``, ``.. math::``, ``:class:`` cross-references, doctest examples):
autodoc and napoleon render them as written. Guides are Markdown (MyST).
Math is rendered by KaTeX from local files (no CDN): the JavaScript that
sphinxcontrib-katex ships, the style sheet and fonts of Debian's ``libjs-katex``
(or the folder in ``CURVLINOPS_KATEX_DIR``). Nothing is fetched while building
or reading.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from sphinx.errors import ConfigError

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # this checkout's curvlinops, not an installed one
sys.path.insert(0, str(DOCS / "_ext"))

import curvlinops  # noqa: E402

project = "curvlinops"
author = "the curvlinops developers"
copyright = "the curvlinops developers"  # noqa: A001
release = version = curvlinops.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib.katex",
    "myst_parser",
    "apipages",
    "benchpages",
    "gallery",
]

exclude_patterns = ["_build", "**/README.md", "_ext"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
highlight_language = "text"  # unlabelled blocks: command lines and printed tables

# docstrings
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
add_module_names = False
python_display_short_literal_types = True

# Markdown: $...$ math, ::: fences, heading anchors for links within a page
myst_enable_extensions = ["dollarmath", "colon_fence", "attrs_block"]
myst_heading_anchors = 3

# KaTeX, from local files only
KATEX_DIR = Path(os.environ.get("CURVLINOPS_KATEX_DIR", "/usr/share/javascript/katex"))
if not (KATEX_DIR / "katex.min.css").is_file():
    raise ConfigError(
        f"KaTeX's style sheet is not in {KATEX_DIR}. Install Debian's libjs-katex "
        "(apt-get install libjs-katex; scripts/setup.sh --docs does) or point "
        "CURVLINOPS_KATEX_DIR at a folder holding katex.min.css and fonts/."
    )
_katex_static = DOCS / "_build" / "katex-static"
shutil.rmtree(_katex_static, ignore_errors=True)
shutil.copytree(KATEX_DIR, _katex_static / "katex", ignore=shutil.ignore_patterns("*.mjs"))
katex_css_path = "katex/katex.min.css"
katex_prerender = False

# HTML
html_theme = "pydata_sphinx_theme"
html_title = f"curvlinops {release}"
html_static_path = ["_static", str(_katex_static)]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_show_sourcelink = False
html_last_updated_fmt = None
# pages without sub-pages: no empty left sidebar, the width goes to their tables
html_sidebars = {"index": [], "guide/*": [], "benchmarks/*": []}
