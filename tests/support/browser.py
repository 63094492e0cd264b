"""Headless Chromium for tests of the offline pages: the rendered DOM, a screenshot, and the requests it refused.

Chromium is a Debian package (`apt-get install -y chromium`); tests that need it skip
with that line as the reason when it is missing. Pages carry a Content-Security-Policy
that forbids every request; Chromium logs each blocked one as a console message, which
`render` collects, so a test can assert that a page asked for nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs headless Chromium: apt-get install -y chromium chromium-driver"
)
# Any request that slips past the policy goes to a closed loopback port instead of the network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--proxy-server=127.0.0.1:9", "--no-first-run", "--disable-extensions"]


@dataclass(frozen=True)
class Rendered:
    dom: str  # the DOM after rendering, serialised
    blocked: list[str]  # console messages of requests the page's policy blocked


def render(page: Path, screenshot: Path | None = None, width: int = 1100, height: int = 1400) -> Rendered:
    """Load `page` from disk in headless Chromium; its DOM and the requests it tried."""
    args = [CHROMIUM, *FLAGS, f"--window-size={width},{height}"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    blocked = [line for line in out.stderr.splitlines() if "CONSOLE" in line and "Content Security Policy" in line]
    return Rendered(out.stdout, blocked)


def external_urls(html: str) -> list[str]:
    """http(s) URLs that the page would load (src, and href of anything but a link to follow)."""
    loads = re.findall(r"""\bsrc\s*=\s*["']?(https?://[^"' >]+)""", html, flags=re.I)
    tags = re.findall(r"""<(?!a\b)(\w+)[^>]*\bhref\s*=\s*["']?(https?://[^"' >]+)""", html, flags=re.I)
    return loads + [url for _, url in tags] + re.findall(r"url\(\s*['\"]?(https?://[^)'\"]+)", html, flags=re.I)


def visible_text(dom: str) -> str:
    """The DOM's text without tags, whitespace collapsed (what a reader sees, roughly)."""
    no_style = re.sub(r"<(style|title)[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", no_style)).strip()


# Measures every SVG text where Chromium drew it (getBBox, in the SVG's own units).
MEASURE_SCRIPT = """<script>
const boxes = [];
document.querySelectorAll("svg").forEach((svg, chart) => {
  const view = svg.viewBox.baseVal;
  svg.querySelectorAll("text").forEach(t => {
    const b = t.getBBox();
    boxes.push({chart, text: t.textContent, left: b.x, right: b.x + b.width, top: b.y, bottom: b.y + b.height,
                width: view.width, height: view.height});
  });
});
const out = document.createElement("pre");
out.id = "measured";
out.textContent = JSON.stringify(boxes);
document.body.appendChild(out);
</script>"""


@dataclass(frozen=True)
class TextBox:
    """Where Chromium drew one SVG text, and the size of its chart (`chart`: the SVG's index on the page)."""

    chart: int
    text: str
    left: float
    right: float
    top: float
    bottom: float
    width: float
    height: float

    @property
    def inside(self) -> bool:
        return self.left >= 0 and self.right <= self.width and self.top >= 0 and self.bottom <= self.height

    def overlaps(self, other: TextBox) -> bool:
        return (self.chart == other.chart and self.left < other.right and other.left < self.right
                and self.top < other.bottom and other.top < self.bottom)


def measure_svg_text(page: Path, folder: Path) -> list[TextBox]:
    """Every SVG text of `page` as Chromium lays it out.

    The pages forbid scripts; a copy without the policy, with a measuring script, is
    rendered in `folder` (the page itself is left as it is).
    """
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    copy = folder / f"measured-{page.name}"
    copy.write_text(html.replace("</body>", MEASURE_SCRIPT + "</body>"))
    dom = render(copy).dom
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, flags=re.S)
    assert found, "the measuring script did not run"
    return [TextBox(**box) for box in json.loads(unescape(found.group(1)))]
