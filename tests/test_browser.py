"""The report as a person sees it: rendered by headless Chromium (Debian's ``chromium``,
driven with Playwright, no browser download) at a 1,000 px wide window.

Outside CI the test skips when Chromium or Playwright is missing; in CI (``CI`` set, as
``.ci/run`` does) a missing one is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cnalens.report import render_report
from test_report import full_results

WIDTH = 1000
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# every element that shows text of its own, with its computed font size (px)
TEXT_SIZES = """() => {
  const out = [];
  for (const el of document.body.querySelectorAll('*')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.getClientRects().length) continue;
    out.push([el.tagName, el.textContent.trim().slice(0, 40),
              parseFloat(getComputedStyle(el).fontSize)]);
  }
  return out;
}"""


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    ci = bool(os.environ.get("CI"))
    if not Path(path).is_file():
        if ci:
            pytest.fail("CI: /usr/bin/chromium missing (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); required in CI")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if ci:
            pytest.fail("CI: the playwright package is missing (pip install -e '.[dev]')")
        pytest.skip("playwright not installed (pip install -e '.[dev]')")
    return path


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """The rendered report of a main-job-shaped results folder, loaded in Chromium."""
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser")
    report = render_report(full_results(tmp), strict=True)
    errors: list[str] = []
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp / "profile"), executable_path=exe, headless=True, args=ARGS,
            viewport={"width": WIDTH, "height": 900}, timeout=120_000)
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri(), wait_until="load")
            page.screenshot(path=str(tmp / "report.png"), full_page=True)
            yield page, errors
        finally:
            ctx.close()


def test_findings_come_first_and_name_the_top_head(browser_page):
    page, _ = browser_page
    sections = page.eval_on_selector_all("main > section", "els => els.map(e => e.id)")
    assert sections[0] == "findings"
    text = page.inner_text("#findings")
    assert "Top head for +: 7.0 (layer 7, head 0)" in text
    assert "drops accuracy by 87.5% [52.9, 97.8] vs random 0.0% at K = 10" in text
    assert page.locator("#findings").is_visible()
    assert page.locator("#findings").bounding_box()["y"] < 1200  # within the first screens


def test_figures_are_wide_and_nothing_errs(browser_page):
    page, errors = browser_page
    widths = page.eval_on_selector_all(
        "img, svg", "els => els.map(e => [e.alt || e.tagName, e.getBoundingClientRect().width])")
    assert len(widths) >= 5
    for name, w in widths:
        assert w >= 600, f"{name}: {w:.0f} px wide"
    assert not errors


def test_no_text_under_10px(browser_page):
    page, _ = browser_page
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    sizes = page.evaluate(TEXT_SIZES)
    assert len(sizes) > 100
    small = [s for s in sizes if s[2] < 10]
    assert not small, small[:10]
    # the opened toggles hold the rest of the top heads and the few-shot prefixes
    assert page.locator("text=All 30 rows").is_visible()
    assert page.locator(".pre-box").count() == 20
