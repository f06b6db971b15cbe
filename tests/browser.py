"""Headless Chromium for the browser tests (Debian's ``chromium`` and ``chromium-driver``, driven by selenium):
the local binaries only, so selenium never looks for a driver on the network."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: Set to a folder (e.g. docs) to keep the tests' screenshots there.
SCREENSHOTS_ENV = "KDRAY_SCREENSHOTS"


@contextlib.contextmanager
def chromium(width: int = 1200, height: int = 1000) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} missing: bash scripts/setup.sh installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def keep_screenshot(driver, path: Path, name: str) -> None:
    """Saves a full-page screenshot to ``path``, and a copy under ``$KDRAY_SCREENSHOTS`` when it is set."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, min(max(int(height) + 40, 600), 4000))
    driver.save_screenshot(str(path))
    if os.environ.get(SCREENSHOTS_ENV):
        shutil.copy(path, Path(os.environ[SCREENSHOTS_ENV]) / name)
