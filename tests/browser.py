"""A real headless Chromium for the tests of HTML pages: does the page load, do its images
decode, does anything go wrong in the console."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# Injected into a copy of the page (the report itself has no script): records script
# errors, failed resource loads and console.error calls, and whether every image decoded.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => __errors.push(String(e.message || (e.target && e.target.src)
  || 'error').slice(0, 200)), true);
const _error = console.error; console.error = (...a) => { __errors.push(a.join(' ')); _error(...a); };
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const out = document.createElement('pre'); out.id = 'probe';
  out.textContent = JSON.stringify({images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length, errors: __errors});
  document.body.appendChild(out);
});
</script>"""


def load_in_chromium(chromium, html_path, profile):
    probe_path = html_path.with_name("probe-" + html_path.name)
    probe_path.write_text(html_path.read_text().replace("<head>", "<head>" + PROBE, 1))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", probe_path.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading:\n{done.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return result, console


def chromium_or_skip():
    """The browser's path; skips the test without one (fails it in CI, which must run it)."""
    path = find_chromium()
    if path is None:
        reason = "Chromium not installed: `make install` installs Debian's chromium (as root)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run this test")
        pytest.skip(reason)
    return path
