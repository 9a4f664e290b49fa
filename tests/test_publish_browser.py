"""The published site in a real browser: headless Chromium driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (commands on fd 3, replies on fd 4, one JSON
message per NUL-terminated frame), so the test needs no websocket or Playwright package: it opens the
index, clicks a value to its result page and goes back, sorts a column with the site's own script,
checks that nothing is requested from outside the site and that the CSP blocked nothing of the
site's own, and saves screenshots to test-artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from test_publish import HOSTILE_IMG, build_results, make_result, sample_lines, write_result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DEADLINE_S = 60  # how long a page may take to load before the test fails (a hang guard, not a timing check)


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol on a pipe."""

    def __init__(self, width: int = 1200, height: int = 800):
        self.profile = tempfile.mkdtemp(prefix="harness-chromium-")
        commands_r, self._commands_w = os.pipe()
        self._replies_r, replies_w = os.pipe()

        def child_fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(commands_r), os.dup(replies_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"]
        self.process = subprocess.Popen([CHROMIUM, *flags], pass_fds=(3, 4), preexec_fn=child_fds,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(replies_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept in ``events``)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str) -> Any:
        """Poll until ``expression`` is truthy (a page being replaced may refuse evaluation meanwhile)."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                value = self.js(expression)
                if value:
                    return value
            except RuntimeError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"still false after {DEADLINE_S} s: {expression}")
            time.sleep(0.05)

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        """A PNG of the viewport (or of the whole page, up to 4000 px high)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1})
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands_w)
        os.close(self._replies_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A site from the hostile, many-marks results of test_publish plus a few more rows to sort."""
    root = tmp_path_factory.mktemp("publish-browser")
    results = root / "results"
    build_results(results)
    for i, value in enumerate((0.55, 0.65, 0.35)):
        write_result(results, make_result(f"acc-extra{i}", f"model_{i}", value=value, stderr=0.03), sample_lines(4))
    out = root / "site"
    res = run_cli("publish", results, "--site", out, "--title", "Demo leaderboard")
    assert res.exit_code == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def browser():
    chrome = Browser()
    yield chrome
    chrome.close()


def table_order(browser: Browser, table: int, column: int) -> list[float | None]:
    """The values of one column of an index table, top to bottom (None for an empty cell)."""
    return browser.js(
        f"Array.from(document.querySelectorAll('#table-{table} table.board tbody tr')).map(r => "
        f"{{ const v = r.cells[{column}].getAttribute('data-value'); return v === '' ? null : Number(v); }})")


def test_index_to_result_page_and_back(site, browser):
    index = (site / "index.html").as_uri()
    browser.open(index)
    assert browser.js("document.title") == "Demo leaderboard"  # the hostile ids ran nothing
    assert browser.js("document.querySelectorAll('section[id^=table-]').length") == 2
    assert browser.wait_for("document.querySelectorAll('button.sort').length") > 0  # the sort script ran
    ARTIFACTS.mkdir(exist_ok=True)
    browser.screenshot(ARTIFACTS / "publish-index.png", full_page=True)

    link = browser.js("document.querySelector('#table-2 td.best a').getAttribute('href')")
    assert link.startswith("results/") and link.endswith("/index.html")
    browser.js("document.querySelector('#table-2 td.best a').click()")
    target = (site / link).as_uri()
    browser.wait_for(f"location.href === {json.dumps(target)} && document.readyState === 'complete'")
    assert browser.js("document.querySelector('h1').textContent").startswith("accuracy: ")
    images = browser.js("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])")
    assert all(loaded and alt for loaded, alt in images)
    assert browser.js("document.querySelectorAll('table.samples tbody tr').length") > 0
    browser.screenshot(ARTIFACTS / "publish-result.png", full_page=True)

    browser.js("history.back()")
    browser.wait_for(f"location.href === {json.dumps(index)} && document.readyState === 'complete'")
    assert browser.js("document.querySelectorAll('#table-2 table.board tbody tr').length") == 9


def test_plot_page_shows_its_images(site, browser):
    page = (site / "results" / "del-alpha" / "index.html").as_uri()
    browser.open(page)
    browser.wait_for("Array.from(document.images).every(i => i.complete)")
    images = browser.js("Array.from(document.images).map(i => [i.naturalWidth, i.alt])")
    assert len(images) == 1 and images[0][0] == 120 and images[0][1].startswith("curve plot of deletion")


def test_sorting_a_column_best_first_then_reversed(site, browser):
    browser.open((site / "index.html").as_uri())
    browser.wait_for("document.querySelectorAll('button.sort').length")
    column = browser.js(
        "Array.from(document.querySelectorAll('#table-2 thead th')).findIndex(th => "
        "th.querySelector('.colname') && th.querySelector('.colname').textContent === 'accuracy')")
    assert column > 0
    before = table_order(browser, 2, column)
    browser.js(f"document.querySelectorAll('#table-2 thead th')[{column}].querySelector('button.sort').click()")
    best_first = table_order(browser, 2, column)
    numbers = [v for v in best_first if v is not None]
    assert numbers == sorted(numbers, reverse=True) and best_first[len(numbers):] == [None] * (len(best_first) - len(numbers))
    assert best_first != before and sorted(map(str, best_first)) == sorted(map(str, before))
    assert browser.js(f"document.querySelectorAll('#table-2 thead th')[{column}].getAttribute('aria-sort')") == "descending"
    browser.js("document.querySelector('#table-2').scrollIntoView()")
    browser.screenshot(ARTIFACTS / "publish-sorted.png")
    browser.js(f"document.querySelectorAll('#table-2 thead th')[{column}].querySelector('button.sort').click()")
    numbers = [v for v in table_order(browser, 2, column) if v is not None]
    assert numbers == sorted(numbers)
    # the model column sorts by name
    browser.js("document.querySelectorAll('#table-2 thead th')[0].querySelector('button.sort').click()")
    names = browser.js("Array.from(document.querySelectorAll('#table-2 tbody th')).map(th => th.getAttribute('data-value').toLowerCase())")
    assert names == sorted(names)


def test_component_page_and_readable_without_scripts(site, browser):
    browser.open((site / "metrics" / "accuracy.html").as_uri())
    assert browser.js("document.querySelector('h1').textContent") == "metric accuracy"
    browser.screenshot(ARTIFACTS / "publish-metric.png")
    browser.call("Emulation.setScriptExecutionDisabled", session=True, value=True)
    try:
        browser.open((site / "index.html").as_uri())
        assert browser.js("document.querySelectorAll('button.sort').length") == 0  # the script did not run...
        assert browser.js("document.querySelectorAll('#table-2 tbody tr').length") == 9  # ...and every row is there
        assert browser.js("getComputedStyle(document.querySelector('td.best strong')).fontWeight") == "700"
        assert browser.js("getComputedStyle(document.querySelector('td.best')).backgroundColor") != "rgba(0, 0, 0, 0)"
    finally:
        browser.call("Emulation.setScriptExecutionDisabled", session=True, value=False)


def test_nothing_outside_the_site_was_requested_and_nothing_was_blocked(site, browser):
    browser.events.clear()
    browser.open((site / "index.html").as_uri())
    browser.wait_for("document.querySelectorAll('button.sort').length")
    browser.open((site / "results" / "del-alpha" / "index.html").as_uri())
    browser.wait_for("Array.from(document.images).every(i => i.complete)")
    browser.js("0")  # collect the events that arrived meanwhile
    requested = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requested, "no requests recorded"
    root = site.resolve().as_uri() + "/"
    assert all(url.startswith(root) or url == "about:blank" for url in requested), requested
    assert any(url.endswith("/assets/sort.js") for url in requested) and any(url.endswith("/assets/site.css") for url in requested)
    errors = [e["params"]["entry"]["text"] for e in browser.events
              if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    errors += [json.dumps(e["params"]) for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    assert errors == []  # no CSP violation, no failed load, no script error
    failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
    assert failed == []
    assert HOSTILE_IMG  # the hostile <img> model id is in the site (test_publish checks it stays text)
