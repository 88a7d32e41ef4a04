"""Headless Chromium (Debian's package) driven by Playwright (PyPI): what a person sees in a web UI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Debian's /usr/bin/chromium is a shell wrapper; Playwright drives the browser binary itself
CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")


def chromium_binary() -> str | None:
    for candidate in CANDIDATES:
        found = candidate if Path(candidate).is_file() else shutil.which(candidate)
        if found:
            return found
    return None


def mlflow_compare_view(chromium: str, base_url: str, experiment_id: str, run_ids: list[str],
                        screenshot: Path, metric: str) -> tuple[str, list[str]]:
    """The MLflow UI's comparison of `run_ids`: the page's text once its plot shows `metric`, with a
    screenshot of that view written to `screenshot`, and `metric`'s row of the metrics table (each
    run's value as the page shows it), scrolled to as a person would."""
    from playwright.sync_api import sync_playwright

    url = f"{base_url}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment_id])}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1300})
            page.goto(url)
            page.get_by_text("Run details").wait_for(timeout=60_000)
            page.locator(f'text.axis-title[data-unformatted="{metric}"]').wait_for(timeout=60_000)
            page.screenshot(path=str(screenshot))
            return page.inner_text("body"), metric_row(page, metric)
        finally:
            browser.close()


def metric_row(page, metric: str) -> list[str]:
    """A metric's values in the compare view's metrics table: two virtualised grids (names, values)
    scrolled together until the metric's row is drawn, its values the cells at the same height."""
    names = page.locator("div.ReactVirtualized__Grid__innerScrollContainer").first
    names.locator("div").first.wait_for(timeout=60_000)
    for _ in range(400):
        if names.get_by_text(metric, exact=True).count():
            break
        page.evaluate("() => document.querySelectorAll('div.ReactVirtualized__Grid').forEach(g => g.scrollTop += 250)")
        page.wait_for_timeout(50)
    return page.evaluate("""(metric) => {
        const [names, values] = document.querySelectorAll('div.ReactVirtualized__Grid__innerScrollContainer');
        const row = [...names.children].find(cell => cell.innerText.trim() === metric);
        return row ? [...values.children].filter(cell => cell.style.top === row.style.top)
                                         .map(cell => cell.innerText.trim()) : [];
    }""", metric)
