"""Pages checked as a person sees them: a real headless Chromium (Debian's `chromium`, which
.ci/run installs) driven through Playwright, with console errors collected, images checked and
screenshots kept in `test-artifacts/` (or $STAGESWEEP_ARTIFACTS) for a person to look at.

Without a Chromium the browser tests are skipped, except where STAGESWEEP_REQUIRE_BROWSER=1
(CI sets it), where a missing browser fails them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("STAGESWEEP_ARTIFACTS", REPO / "test-artifacts"))
# Flags of a quiet, offline, throwaway browser (Playwright adds a fresh --user-data-dir).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def chromium_path() -> str | None:
    found = os.environ.get("STAGESWEEP_CHROMIUM")
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = found or shutil.which(name)
    return found


def require_browser() -> str:
    """The Chromium binary, or skip (fail in CI) when there is none."""
    path = chromium_path()
    if path:
        return path
    message = "no chromium binary (apt-get install -y chromium, or set STAGESWEEP_CHROMIUM)"
    if os.environ.get("STAGESWEEP_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class CheckedPage:
    """A page plus every console error and uncaught exception it produced."""

    page: object
    errors: list[str] = field(default_factory=list)

    def images_loaded(self) -> tuple[int, list[str]]:
        """(image count, sources of images that did not load)."""
        broken = self.page.evaluate(
            "[...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.src.slice(0, 80))")
        return self.page.evaluate("document.images.length"), broken

    def screenshot(self, name: str) -> Path:
        """Save a full-page screenshot as an artifact and check it is not blank."""
        from PIL import Image

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        with Image.open(path) as image:
            colours = image.convert("RGB").resize((200, 200)).getcolors(200 * 200)
        assert colours is not None and len(colours) > 20, f"{path} looks blank"
        return path


@contextmanager
def browser_session() -> Iterator[object]:
    """A Playwright Chromium browser on the system's Chromium binary (no download)."""
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, *, width: int = 1400) -> CheckedPage:
    page = browser.new_page(viewport={"width": width, "height": 900})
    checked = CheckedPage(page)
    page.on("console", lambda m: m.type == "error" and checked.errors.append(m.text))
    page.on("pageerror", lambda e: checked.errors.append(str(e)))
    page.goto(url)
    return checked
