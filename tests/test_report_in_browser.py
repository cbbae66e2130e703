"""The HTML report in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Chromium is looked for at ``$CONFORMANCE_CHROMIUM``, else on the PATH. Without it the test fails under
CI (``.ci/run`` installs it) and is skipped, saying why, elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

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


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium and Playwright, or the skip (or failure, under CI) that says which is missing: a session fixture
    that the tests ask for first, so that it is decided before the runs they share are made (minutes)."""
    pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[test]'")
    return _chromium()


@pytest.fixture
def page(chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield browser.new_page(viewport={"width": 1280, "height": 900})
        browser.close()


@pytest.mark.xdist_group("recorded_run")  # one worker records the run its tests share
def test_the_report_shows_its_matrix_and_failure_cards_offline(chromium, recorded_run, page, tmp_path):
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


@pytest.mark.release
@pytest.mark.xdist_group("gate")  # one worker runs the gate its tests share
def test_a_failing_releases_report_opens_on_its_root_cause_and_the_case_that_shows_it(chromium, gate_on_0_4_4, page):
    _, out = gate_on_0_4_4
    page.goto((out / "report.html").as_uri(), wait_until="load")
    assert page.locator("h2").first.inner_text().startswith("Failures by root cause: ")
    cause = page.locator("#cause-1")
    heading = cause.locator("h3").first
    assert heading.inner_text() == (
        "1. mlx_vlm.LoRaLayer: the LoRA scale is off by a factor r: the raw alpha is used where alpha / r belongs"
    )
    card = cause.locator(".card-fail")
    assert card.is_visible() and "the LoRA term is 2.000× peft's" in card.inner_text()
    assert "Replay with this suite" in card.inner_text()
    first_screen = page.viewport_size["height"]
    assert heading.bounding_box()["y"] < first_screen and card.bounding_box()["y"] < first_screen
