"""The built site, checked as a reader sees it (run after the build, see .ci/run).

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
    .venv/bin/python -m pytest -q docs/test_site.py

Three pages (home, an operator's API page, a gallery page) are served over
loopback HTTP and rendered by headless Chromium (Debian's ``chromium``); a small
probe script, added to each page as it is served, records after the page's
``load`` event what the reader got: the images that loaded, the formulas KaTeX
rendered, the links. Screenshots go to ``docs/_build/screenshots``. The other
tests read the whole site's HTML: every public name has a page with its
anchor, and no internal link or image points nowhere.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

DOCS = Path(__file__).resolve().parent
SITE = DOCS / "_build" / "html"
SCREENSHOTS = DOCS / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PAGES = {
    "home": ("index.html", "curvlinops"),
    "operator": ("api/curvlinops.HessianLinearOperator.html", "HessianLinearOperator"),
    "gallery": ("gallery/spectral_density.html", "spectral density"),
}

PROBE = """
window.addEventListener("load", async () => {
  await document.fonts.ready;
  const images = [...document.querySelectorAll("article img")].map(
    (img) => ({src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0}));
  const math = [...document.querySelectorAll(".math")];
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    title: document.title,
    h1: (document.querySelector("article h1") || {}).innerText || "",
    images: images,
    math: math.length,
    rendered: math.filter((m) => m.querySelector(".katex")).length,
    katex_errors: document.querySelectorAll(".katex-error").length,
    katex_font: document.fonts.check("16px KaTeX_Main"),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.getAttribute("href")),
  }));
});
"""

# Skipped where the site or Chromium is missing, except in CI (CI=true), where .ci/run
# builds the site and scripts/setup.sh installs Chromium: there a missing one fails.
IN_CI = bool(os.environ.get("CI"))
needs_site = pytest.mark.skipif(
    not IN_CI and not (SITE / "index.html").exists(),
    reason="build the site first (see this module's docstring)",
)
needs_chromium = pytest.mark.skipif(
    not IN_CI and CHROMIUM is None, reason="needs chromium (apt-get install chromium)"
)


class _ProbingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; adds the probe to every HTML page."""

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = (
            path.read_text(encoding="utf-8")
            .replace("</body>", f"<script>{PROBE}</script></body>", 1)
            .encode()
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        import io

        return io.BytesIO(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_ProbingHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def chromium(*args: str) -> str:
    """Run headless Chromium once; its stdout."""
    assert CHROMIUM, "chromium is not installed (scripts/setup.sh installs it as root)"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        "--virtual-time-budget=15000",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(url: str, screenshot: Path) -> dict:
    """What the probe saw on ``url``; also saves a screenshot."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={screenshot}", url)
    dom = chromium("--dump-dom", url)
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, f"the probe did not run on {url} (no load event?)"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@needs_site
@needs_chromium
@pytest.mark.parametrize("page", PAGES)
def test_page_as_a_reader_sees_it(server, page):
    path, title = PAGES[page]
    seen = render(server + path, SCREENSHOTS / f"{page}.png")
    assert title.lower() in seen["title"].lower() and title.lower() in seen["h1"].lower(), seen
    broken = [i["src"] for i in seen["images"] if not i["loaded"]]
    assert not broken, f"images that did not load on {path}: {broken}"
    if page in ("home", "gallery"):
        assert seen["images"], f"{path} shows no image"
    if page in ("home", "operator"):
        assert seen["math"] > 0, f"{path} has no formula"
    assert seen["rendered"] == seen["math"] and seen["katex_errors"] == 0, seen
    if seen["math"]:
        assert seen["katex_font"], "KaTeX's fonts did not load"
    assert not broken_links(path, seen["links"])
    assert (SCREENSHOTS / f"{page}.png").stat().st_size > 10_000  # not a blank page


class _Anchors(HTMLParser):
    """Collects ids, and the targets of links and images, of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.links.append(attrs["src"])


@functools.cache
def parsed(path: Path) -> _Anchors:
    parser = _Anchors()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def broken_links(page: str, links: list[str]) -> list[str]:
    """The internal links of ``page`` whose file or anchor does not exist."""
    broken = []
    for link in links:
        url = urlparse(urljoin(f"http://site/{page}", link))
        if url.netloc != "site" or link.startswith(("mailto:", "javascript:")):
            continue
        target = SITE / unquote(url.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(link)
        elif url.fragment and target.suffix == ".html" and url.fragment not in parsed(target).ids:
            broken.append(link)
    return broken


@needs_site
def test_no_broken_internal_link_anywhere():
    pages = sorted(SITE.rglob("*.html"))
    assert len(pages) > 50, f"{SITE} holds {len(pages)} pages: not built?"
    broken = {}
    for page in pages:
        relative = str(page.relative_to(SITE))
        bad = broken_links(relative, parsed(page).links)
        if bad:
            broken[relative] = bad
    assert not broken


@needs_site
def test_nothing_is_fetched_from_elsewhere():
    """No script, style sheet, font or image comes from another host."""
    for page in SITE.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not re.search(r'<(script|link|img)[^>]+(src|href)="(https?:)?//', text), page


@needs_site
def test_every_public_name_has_a_page():
    import sys

    sys.path.insert(0, str(DOCS / "_ext"))
    from apipages import public_sections, resolve

    missing = []
    for section in public_sections():
        for name in section.names:
            full, _ = resolve(section, name)
            page = SITE / "api" / f"{full}.html"
            if not page.is_file() or full not in parsed(page).ids:
                missing.append(full)
    assert not missing, f"public names without an API page: {missing}"
