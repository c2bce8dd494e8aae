"""Headless Chromium for the tests that look at pages as a person would (MLflow UI, predict's report).

Debian's ``chromium`` (make system-deps installs it), a fresh profile per call, no network traffic
of its own; :class:`VisibleText` collects what a reader sees of the dumped DOM.
"""
from __future__ import annotations

import html.parser
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make system-deps installs it)")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update", "--hide-scrollbars")


def chromium(args: list[str], profile: str, window: str = "1400,2600", timeout: int = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with the fresh profile folder ``profile`` and ``args`` (URL last)."""
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window}", *args],
                          capture_output=True, text=True, timeout=timeout)


class VisibleText(html.parser.HTMLParser):
    """The text nodes of a page outside ``hidden`` elements (scripts, styles...), in order."""

    def __init__(self, hidden: tuple[str, ...] = ("script", "style", "noscript")) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden_tags = hidden
        self._hidden = 0

    def handle_starttag(self, tag, attrs) -> None:
        self._hidden += tag in self._hidden_tags

    def handle_endtag(self, tag) -> None:
        self._hidden -= tag in self._hidden_tags

    def handle_data(self, data) -> None:
        if not self._hidden and data.strip():
            self.parts.append(data.strip())
