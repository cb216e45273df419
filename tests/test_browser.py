"""The demo in a real browser: headless Chromium (driven by playwright) uploads a photo, types a
query, presses Run and gets the overlay; then clicks on the downscaled image in the click tab.

Needs Chromium from the system (Debian: ``apt-get install chromium``; .ci/run installs it) and
the ``playwright`` Python package; ``playwright install`` is never used. Set
``LANGSAM_TEST_CHROMIUM`` to a browser binary to use another one. Without a browser the test
is skipped with a loud reason (printed, and in pytest's -ra summary); with
``LANGSAM_REQUIRE_BROWSER=1`` it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

import pytest

from demo_support import TEST_MAX_DISPLAY_SIDE, save_photo, serve, tiny_model_settings

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
]
TIMEOUT_MS = 60_000


def _find_chromium() -> str | None:
    override = os.environ.get("LANGSAM_TEST_CHROMIUM")
    if override:
        return override
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _no_browser(reason: str):
    message = f"BROWSER TEST NOT RUN: {reason}"
    print(f"\n{message}\n", file=sys.stderr)
    if os.environ.get("LANGSAM_REQUIRE_BROWSER", "").strip() not in ("", "0"):
        pytest.fail(f"{message} (LANGSAM_REQUIRE_BROWSER is set)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser_context():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the 'playwright' Python package is not installed (pip install playwright)")
    executable = _find_chromium()
    if executable is None or not os.access(executable, os.X_OK):
        _no_browser(f"no Chromium found ({executable or 'not on PATH'}; apt-get install chromium, "
                    "or set LANGSAM_TEST_CHROMIUM to a browser binary)")
    with tempfile.TemporaryDirectory(prefix="langsam-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory, tiny_sam_checkpoint):
    from langsam.demo import build_app

    settings = tiny_model_settings(tmp_path_factory.mktemp("browser-models"), tiny_sam_checkpoint)
    # LangSAM settings, as `langsam demo` passes them: the models load on the first request.
    app = build_app(settings, max_display_side=TEST_MAX_DISPLAY_SIDE)
    with serve(app) as url:
        yield url


def _natural_size(locator) -> tuple[int, int]:
    return tuple(locator.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def test_browser_text_and_click_tabs(browser_context, demo_url, tmp_path):
    small_path, large_path = tmp_path / "small.png", tmp_path / "chelsea.png"
    small = save_photo(small_path, "chelsea", crop=(150, 200))
    large = save_photo(large_path, "chelsea")  # 451 x 300, shown at 256 x 170
    page = browser_context.new_page()
    page.goto(demo_url)

    # ---- Text tab: upload, query, Run, overlay.
    page.locator("#text-image input[type=file]").set_input_files(str(small_path))
    page.locator("#text-image img").wait_for()
    page.locator("#text-queries textarea").fill("cat")
    page.get_by_text("Thresholds").click()
    page.locator("#text-max-objects input").fill("2")
    page.locator("#text-run").click()
    overlay = page.locator("#text-overlay img")
    overlay.wait_for()
    page.wait_for_function(
        "() => { const img = document.querySelector('#text-overlay img'); return img && img.naturalWidth > 0; }"
    )
    assert _natural_size(overlay) == (small.shape[1], small.shape[0])
    status = page.locator("#text-status").inner_text()
    assert re.search(r"\d+ object\(s\) in grounded mode", status), status

    # ---- Click tab: the click lands on a downscaled view and must map to original pixels.
    page.get_by_role("tab", name="Click and box").click()
    page.locator("#click-image input[type=file]").set_input_files(str(large_path))
    page.get_by_text("Image embedded (451x300)").wait_for()
    view = page.locator("#click-view img")
    view.wait_for()
    scale = TEST_MAX_DISPLAY_SIDE / max(large.shape[:2])
    assert _natural_size(view) == (round(large.shape[1] * scale), round(large.shape[0] * scale))
    view.click()  # the centre of the shown image
    page.get_by_text(re.compile(r"Positive point at \(\d+, \d+\)")).wait_for()
    x, y = map(int, re.search(r"\((\d+), (\d+)\)", page.locator("#click-status").inner_text()).groups())
    assert abs(x - large.shape[1] / 2) <= 3 and abs(y - large.shape[0] / 2) <= 3, (x, y)
    candidates = page.locator("#click-candidates label")
    page.wait_for_function("() => document.querySelectorAll('#click-candidates label').length === 3")
    labels = [candidates.nth(i).inner_text() for i in range(3)]
    scores = [float(re.search(r"score (-?[\d.]+)", label).group(1)) for label in labels]
    assert scores == sorted(scores, reverse=True), labels
