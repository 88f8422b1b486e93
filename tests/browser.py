"""Headless Chromium from Debian's package (/usr/bin/chromium), driven by Playwright, for the
`ui` tests (`make test-ui`, which installs both): never Playwright's own browser downloads,
a fresh profile per test, nothing reached past loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that reaches past loopback (updates, sync, QUIC, first-run pages).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(os.environ.get("XOPD_UI_SHOTS", "/tmp/ui_shots"))


@pytest.fixture()
def page(tmp_path: Path) -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="make test-ui installs it")
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: make test-ui installs Debian's chromium")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "user-data"),  # a fresh profile
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            tab = browser.new_page()
            tab.set_default_timeout(120_000)  # the UI's first load on 2 busy cores
            yield tab
        finally:
            browser.close()
