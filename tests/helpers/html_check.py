"""Is an HTML report self-contained? The KFP UI shows an HTML artifact alone, in a sandboxed iframe (its HTMLViewer
sets srcdoc), so anything the page refers to outside itself (a relative link or image, a stylesheet, a script, a
url() in CSS) is dead there. `outside_references(html)` lists each such reference."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_ATTRS = {"href", "src", "srcset", "action", "data", "poster", "background"}
_CSS_URL = re.compile(r"url\(\s*['\"]?(?!data:)([^'\")]+)")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self._in_style = tag == "style"
        for name, value in attrs:
            value = (value or "").strip()
            if name in _ATTRS and value and not value.startswith(("data:", "#")):
                self.found.append(f"<{tag} {name}={value!r}>")
            if name == "style":
                self.found += [f"<{tag} style> url({u})" for u in _CSS_URL.findall(value)]

    def handle_data(self, data):
        if self._in_style:
            self.found += [f"<style> url({u})" for u in _CSS_URL.findall(data)]

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False


def outside_references(html: str) -> list[str]:
    collector = _Collector()
    collector.feed(html)
    return collector.found


_PROBE = """<script>
const [wanted, frameHeight, frameWidth] = %s;
// the frame is measured once it has the size the viewer gave it: on a loaded machine the load event can come
// before the frame is laid out at that size, and a page laid out at width 0 would be measured as garbage
const whenSized = (tries) => (innerWidth === frameWidth && innerHeight === frameHeight) || tries > 50
  ? answer() : setTimeout(() => whenSized(tries + 1), 100);
window.addEventListener('load', () => whenSized(0));
const answer = () => {
  const images = [...document.images];
  parent.postMessage({
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src').slice(0, 60)),
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')).filter(h => !h.startsWith('#')),
    fetched: performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:')),
    text: document.body.innerText.length,
    // each wanted element's top edge in the page (null: not there)
    tops: Object.fromEntries(wanted.map(s => {
      const el = document.querySelector(s);
      return [s, el === null ? null : el.getBoundingClientRect().top + scrollY];
    })),
    // the page wider than the frame: its right part is cut off (a table in its own scroll box is not)
    overflow_x: document.documentElement.scrollWidth - frameWidth,
    width: innerWidth,
    height: innerHeight,
  }, '*');
};
</script>"""

# The KFP UI's HTMLViewer: the artifact's HTML as the srcdoc of an iframe sandboxed to scripts only.
_VIEWER = """<!doctype html><html><body style="margin:0">
<iframe id="viewer" sandbox="allow-scripts" style="width:%dpx;height:%dpx;border:0"></iframe>
<pre id="result">no answer from the report</pre>
<script>
window.addEventListener('message', e => { document.getElementById('result').textContent = JSON.stringify(e.data); });
document.getElementById('viewer').srcdoc = %s;
</script></body></html>"""

# The same frame alone at the page's top left, for a screenshot of what the UI shows.
_SCREEN = """<!doctype html><html><body style="margin:0;overflow:hidden">
<iframe id="viewer" sandbox="allow-scripts" style="width:%dpx;height:%dpx;border:0"></iframe>
<script>document.getElementById('viewer').srcdoc = %s;</script></body></html>"""

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "Chromium is a test dependency (.ci/run installs Debian's chromium)"
    return found


def _srcdoc(html: str) -> str:
    import json

    return json.dumps(html).replace("</", "<\\/")


def in_sandboxed_iframe(html: str, tmp_path, width: int = 600, height: int = 600, first_screen=()) -> dict:
    """Load `html` in headless Chromium the way the KFP UI shows an HTML artifact (a sandboxed srcdoc iframe of
    `width` x `height` px); returns what the page saw: its images, the ones that did not load, its links leading
    out, every resource fetched from outside the page, for each selector of `first_screen` whether it starts on
    the first screen, and by how many px the page is wider than the frame."""
    import html as html_lib
    import json
    import subprocess

    probe = _PROBE % json.dumps([list(first_screen), height, width])
    body = html.replace("</body>", probe + "</body>") if "</body>" in html else html + probe
    page = tmp_path / "viewer.html"
    page.write_text(_VIEWER % (width, height, _srcdoc(body)))
    # The answer comes by postMessage after the report's own load event; on a loaded machine headless Chromium can
    # dump the page before it arrives, so a page with no answer is loaded again (a report that never loads fails
    # every time).
    for budget in (10_000, 30_000, 60_000):
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}",
             f"--virtual-time-budget={budget}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        match = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
        assert match, proc.stderr[-2000:]
        answer = html_lib.unescape(match.group(1))
        if answer.startswith("{"):
            seen = json.loads(answer)
            # on the first screen: the element starts above the bottom of the frame as the viewer sized it
            seen["first_screen"] = {s: top is not None and top < height for s, top in seen["tops"].items()}
            return seen
    raise AssertionError(f"the report never finished loading in the viewer: {answer!r} {proc.stderr[-2000:]}")


def screenshot(html: str, name: str, tmp_path, width: int = 600, height: int = 900):
    """Where $DISTAR_SCREENSHOTS names a folder (`make screenshots`), a PNG of the report as the KFP UI's frame of
    `width` px shows it, written there as NAME.png: docs/ shows what the tests render."""
    import os
    import subprocess
    from pathlib import Path

    folder = os.environ.get("DISTAR_SCREENSHOTS")
    if not folder:
        return None
    page = tmp_path / f"screen-{name}.html"
    page.write_text(_SCREEN % (width, height, _srcdoc(html)))
    target = Path(folder).resolve() / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-screen'}", "--hide-scrollbars",
         f"--window-size={width},{height}", "--virtual-time-budget=10000", f"--screenshot={target}", page.as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    return target
