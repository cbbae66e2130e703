"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Chromium is looked for at ``$CONFORMANCE_CHROMIUM``, else on the PATH. Without it the test fails under
CI (``.ci/run`` installs it) and is skipped, saying why, elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytestmark = pytest.mark.xdist_group("recorded_run")  # one worker records the run they share

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("CONFORMANCE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no Chromium: install Debian's chromium package (or set CONFORMANCE_CHROMIUM to a Chromium binary)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def page():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[test]'"
    )
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


def test_the_report_shows_its_matrix_and_failure_cards_offline(recorded_run, page, tmp_path):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    started = time.perf_counter()
    page.goto(recorded_run.report.as_uri(), wait_until="load")
    load_seconds = time.perf_counter() - started
    page.screenshot(path=str(tmp_path / "report.png"))

    matrix = page.locator("#matrix table.matrix").first
    assert matrix.is_visible()
    assert page.locator("#matrix td.subject", has_text="catalogue:RawAlpha").first.is_visible()
    card = page.locator("#failures .card-fail", has_text="catalogue:RawAlpha: forward (float32)")
    assert card.is_visible()
    card.screenshot(path=str(tmp_path / "failure-card.png"))
    assert "the LoRA term is 2.000× peft's" in card.inner_text()

    card.locator("details.script summary").click()
    assert card.locator("details.script pre").is_visible()
    assert "DISAGREE" in card.locator("details.script pre").inner_text()

    link = page.locator("#matrix a.status.fail").first
    target = link.get_attribute("href")
    link.click()
    assert page.locator(target).is_visible()
    assert page.locator("#margins figure svg").count() > 0

    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("report.png", "failure-card.png"))
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert load_seconds < 10, f"the report took {load_seconds:.1f} s to load"
