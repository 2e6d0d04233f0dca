"""Headless Chromium for the console's browser tests: the Debian ``chromium`` and
``chromium-driver`` packages driven by Selenium (nothing downloads a browser). Without them the
tests skip locally with the reason and fail under ``CI=true``.

Screenshots go to ``$CHOREOGRAPH_SCREENSHOTS`` (default: a ``console-screenshots`` directory in
the system's temporary directory), one PNG per page visited, as test artifacts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.brokers import IN_CI

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
T = TypeVar("T")


def screenshot_dir() -> Path:
    path = Path(os.environ.get("CHOREOGRAPH_SCREENSHOTS")
                or Path(tempfile.gettempdir()) / "console-screenshots")  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_chromium() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if not missing:
        return
    message = f"{', '.join(missing)} missing: apt-get install -y chromium chromium-driver"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class Browser:
    """One headless Chromium with a fresh profile, and helpers to wait and take screenshots."""

    def __init__(self, profile: Path, base_url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     f"--user-data-dir={profile}", "--window-size=1400,1000"):  # fmt: skip
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(60)
        self.base_url = base_url

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def text(self) -> str:
        return str(self.driver.find_element("tag name", "body").text)

    def css(self, selector: str) -> Any:
        return self.driver.find_element("css selector", selector)

    def all(self, selector: str) -> list[Any]:
        return list(self.driver.find_elements("css selector", selector))

    # Parts of a page are replaced while it is read (live updates): these read or act in one
    # step inside the page, or retry, so an element replaced meanwhile is never used stale.

    def text_of(self, selector: str) -> str:
        """The visible text of the first element matching ``selector`` ('' when none does)."""
        script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
        return str(self.driver.execute_script(script, selector))

    def attrs(self, selector: str, *names: str) -> list[tuple[str | None, ...]]:
        """For every element matching ``selector``, its attributes ``names``."""
        script = """return Array.from(document.querySelectorAll(arguments[0]))
            .map(e => arguments[1].map(name => e.getAttribute(name)));"""
        return [tuple(row) for row in self.driver.execute_script(script, selector, list(names))]

    def cells(self, rows: str, column: int) -> list[str]:
        """The text of cell ``column`` (from 0) of every row matching ``rows``."""
        script = """return Array.from(document.querySelectorAll(arguments[0]))
            .map(r => r.querySelectorAll('td')[arguments[1]].innerText);"""
        return [str(text) for text in self.driver.execute_script(script, rows, column)]

    def click(self, selector: str) -> None:
        """Click the first element matching ``selector``, finding it again if it was replaced."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt() -> bool:
            try:
                self.css(selector).click()
            except StaleElementReferenceException:
                return False
            return True

        self.wait(attempt, f"a click on {selector!r}")

    def wait(self, check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
        """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                found = check()
                if found:
                    return found
            except Exception as exc:  # the page may be mid-update
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} (last error: {last})\n{self.text()}")

    def wait_text(self, text: str, timeout: float = 30.0) -> None:
        self.wait(lambda: text in self.text(), f"{text!r} on the page", timeout)

    def screenshot(self, name: str) -> Path:
        """Save the whole page (taller than the window if need be) as ``name``.png."""
        height = self.driver.execute_script("return document.body.scrollHeight")
        self.driver.set_window_size(1400, max(900, min(int(height) + 40, 6000)))
        path = screenshot_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1400, 1000)
        return path

    def quit(self) -> None:
        self.driver.quit()
