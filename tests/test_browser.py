"""The HTML leaderboard in a real browser: headless Chromium renders it, and nothing in it runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HOSTILE = "<script>document.title='EXECUTED'</script>"
HOSTILE_IMG = '<img src=x onerror="document.title=\'EXECUTED\'">'


def chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[Path, list[str]]:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("results")
    base = ("run", "--model", "test_resnet", "--random-init", "--limit", "2", "--out", out, "--quiet")
    for extra in (("--metric", "accuracy"), ("--metric", "insertion", "-o", "metric.steps=3")):
        res = run_cli(*base, *extra)
        assert res.exit_code == 0, res.stderr
    # a copy of the accuracy result whose model id is hostile markup
    source = next(p for p in out.glob("accuracy-*.json"))
    data = json.loads(source.read_text())
    data["models"][0]["id"] = HOSTILE
    data["run_id"] = "hostile-" + data["run_id"]
    (out / f"{data['run_id']}.json").write_text(json.dumps(data))
    data["models"][0]["id"] = HOSTILE_IMG
    data["run_id"] = "hostile-img-" + data["run_id"]
    (out / f"{data['run_id']}.json").write_text(json.dumps(data))
    html = out / "leaderboard.html"
    res = run_cli("leaderboard", out, "--format", "html", "--output", html)
    assert res.exit_code == 0, res.stderr
    rows = ["test_resnet [random-init]", HOSTILE + " [random-init]", HOSTILE_IMG + " [random-init]"]
    return html, rows


def test_table_renders_with_the_expected_rows(page, tmp_path):
    html, rows = page
    res = chromium("--dump-dom", html.as_uri())
    assert res.returncode == 0, res.stderr[-1000:]
    dom = res.stdout
    assert "<table>" in dom
    body_rows = re.findall(r"<tr>(.*?)</tr>", dom.split("<tbody>")[1], flags=re.S)
    assert len(body_rows) == 3
    first_cells = [re.sub(r"\s+", " ", re.findall(r"<td>(.*?)</td>", r, flags=re.S)[0]).strip() for r in body_rows]
    import html as html_lib

    assert sorted(html_lib.unescape(c) for c in first_cells) == sorted(rows)
    assert "accuracy ↑" in dom and "insertion steps=3 (saliency, blur:pixel) ↑" in dom


def test_hostile_model_id_shows_as_text_and_runs_nothing(page):
    html, _ = page
    dom = chromium("--dump-dom", html.as_uri()).stdout
    assert "<title>harness leaderboard</title>" in dom
    assert "EXECUTED" not in re.search(r"<title>(.*?)</title>", dom).group(1)
    assert "&lt;script&gt;document.title='EXECUTED'&lt;/script&gt;" in dom  # shown as text
    assert "<script" not in dom.lower()  # no script element in the live DOM
    assert "<img" not in dom.lower()  # the onerror image stayed text


def test_screenshot_is_saved_as_an_artifact(page):
    html, _ = page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "leaderboard.png"
    shot.unlink(missing_ok=True)
    res = chromium(f"--screenshot={shot}", "--window-size=1100,500", html.as_uri())
    assert res.returncode == 0, res.stderr[-1000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1100, 500)
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # text on a light page, not a blank image
