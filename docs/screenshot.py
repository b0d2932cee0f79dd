"""Take the README's screenshot of the call board (docs/board.png).

    amiworker demo --calls 300 --calls-per-second 3 --linger &   # prints the board's URL
    python docs/screenshot.py http://127.0.0.1:8080/ docs/board.png

Headless Debian Chromium driven by Playwright, as the tests do.
"""

from __future__ import annotations

import sys
import tempfile

from playwright.sync_api import sync_playwright

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main(url: str, path: str) -> None:
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path="/usr/bin/chromium",
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#calls tbody tr", timeout=30_000)
        page.wait_for_timeout(2_000)  # a few pushes: the chart and durations move
        page.screenshot(path=path, full_page=True)
        context.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
