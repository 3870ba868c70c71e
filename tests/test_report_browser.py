"""The report in a real browser: headless Chromium renders report.html offline, the screenshot is not blank, and the
DOM after load holds the findings table and every figure decoded (naturalWidth > 0).

The report itself has no script; to read ``img.complete`` / ``naturalWidth`` the test renders a copy of it with a
small checking script appended (a test-only file next to it) and reads the result back with ``--dump-dom``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="chromium not installed (apt-get install chromium; `make test` installs it)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
N_FIGURES = 7

CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images).map(function (img) {
    return {complete: img.complete, width: img.naturalWidth, data: img.src.indexOf('data:image/png;base64,') === 0};
  });
  var out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify({imgs: imgs,
    findings: document.querySelectorAll('#findings tbody tr').length,
    verdicts: document.querySelectorAll('#findings td.verdict').length});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(tmp: Path, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_report import FULL_SPEC, make_demo

    from retain.report import build_report

    return build_report(make_demo(tmp_path_factory.mktemp("demo"), FULL_SPEC))


def test_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", report.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (3000, 1200)
    assert float(img.std()) > 0.05  # not a blank page
    assert float((img.mean(axis=2) < 0.9).mean()) > 0.02  # some ink: text, tables, figures
    assert float(img[:, :, 1].std()) > 0.05


def test_dom_has_findings_and_decoded_images(report: Path, tmp_path: Path) -> None:
    proc = _chromium(tmp_path, "--dump-dom", report.as_uri())
    dom = proc.stdout
    assert 'id="findings"' in dom, proc.stderr[-2000:]
    assert len(re.findall(r"<img\b", dom)) == N_FIGURES

    checked = report.parent / "report_check.html"  # the report plus a checking script; the report stays script-free
    checked.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                       encoding="utf-8")
    proc = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri())
    m = re.search(r'<pre id="img-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stderr[-2000:]
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["findings"] == 7 and result["verdicts"] == 7
    assert len(result["imgs"]) == N_FIGURES
    for img in result["imgs"]:
        assert img["complete"] and img["width"] > 0 and img["data"], img
    assert np.all([i["width"] > 300 for i in result["imgs"]])
