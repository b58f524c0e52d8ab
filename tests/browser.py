"""A report page as a reader's browser shows it: headless Chromium (Debian's ``chromium``) loads the page with a
check script appended, and ``--dump-dom`` returns what the script found.

The script, run after the page's load event: error and stderr outputs (their text), images and how many failed
to decode, the folded code cells and whether they hide their code closed, show it open and hide it again, and
table cells that show "NaN" (a paper column with no value must say so otherwise). ``CI`` in the environment (``.ci/run`` sets it) makes a missing Chromium an error,
not a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK = """<script>
window.addEventListener('load', () => {
  // checkVisibility: a closed <details> hides its content with content-visibility, which offsetHeight does not see
  const visible = el => el.checkVisibility() && el.getClientRects().length > 0 && el.offsetHeight > 0;
  const outputs = [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"], [data-mime-type="application/vnd.jupyter.error"]')];
  const images = [...document.images];
  const folds = [...document.querySelectorAll('details.medcomp-code')];
  const code = d => d.querySelector('.jp-InputArea, .jp-CodeMirrorEditor, pre, .highlight');
  const closedHidden = folds.every(d => !d.open && (!code(d) || !visible(code(d))));
  folds.forEach(d => { d.open = true; });
  const openShown = folds.every(d => !code(d) || visible(code(d)));
  folds.forEach(d => { d.open = false; });
  const closedAgain = folds.every(d => !code(d) || !visible(code(d)));
  const result = {errors: outputs.map(o => o.innerText.trim().slice(0, 300)), images: images.length,
                  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length, folds: folds.length,
                  closedHidden, openShown, closedAgain,
                  nan: [...document.querySelectorAll('td')].filter(cell => /\\bNaN\\b/.test(cell.innerText)).length};  // a table cell, not prose
  const pre = document.createElement('pre'); pre.id = 'medcomp-browser-check'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium (apt-get install chromium)")
    return found


def check_in_browser(page: Path, work: Path) -> dict:
    """What headless Chromium finds on ``page`` (a copy with the check script, in ``work``)."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / page.name
    copy.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={work / 'profile'}", "--virtual-time-budget=20000",
               "--dump-dom", copy.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="medcomp-browser-check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run on {page.name}: {dom[-500:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
