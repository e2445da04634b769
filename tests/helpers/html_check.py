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
window.addEventListener('load', () => {
  const images = [...document.images];
  parent.postMessage({
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src').slice(0, 60)),
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')).filter(h => !h.startsWith('#')),
    fetched: performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:')),
    text: document.body.innerText.length,
  }, '*');
});
</script>"""

# The KFP UI's HTMLViewer: the artifact's HTML as the srcdoc of an iframe sandboxed to scripts only.
_VIEWER = """<!doctype html><html><body><pre id="result">no answer from the report</pre>
<iframe id="viewer" sandbox="allow-scripts" style="width:1200px;height:800px"></iframe>
<script>
window.addEventListener('message', e => { document.getElementById('result').textContent = JSON.stringify(e.data); });
document.getElementById('viewer').srcdoc = %s;
</script></body></html>"""

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "Chromium is a test dependency (.ci/run installs Debian's chromium)"
    return found


def in_sandboxed_iframe(html: str, tmp_path) -> dict:
    """Load `html` in headless Chromium the way the KFP UI shows an HTML artifact; returns what the page saw: its
    images, the ones that did not load, its links leading out, every resource fetched from outside the page."""
    import html as html_lib
    import json
    import subprocess

    body = html.replace("</body>", _PROBE + "</body>") if "</body>" in html else html + _PROBE
    page = tmp_path / "viewer.html"
    page.write_text(_VIEWER % json.dumps(body).replace("</", "<\\/"))
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
            return json.loads(answer)
    raise AssertionError(f"the report never finished loading in the viewer: {answer!r} {proc.stderr[-2000:]}")
