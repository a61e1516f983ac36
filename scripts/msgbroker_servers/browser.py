"""Chromium and its WebDriver from Debian's packages, for the dashboard's browser tests
(core/tests/test_dashboard_browser.py) and its screenshots (docs/dashboard.md)."""

from __future__ import annotations

import shutil

from .apt import apt_install
from .common import Failure, say

PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}
"""The program each Debian package provides."""


def cmd_browser() -> int:
    """Install what is missing; print where the browser and its driver are."""
    missing = [package for program, package in PACKAGES.items() if not shutil.which(program)]
    apt_install(missing)
    for program in PACKAGES:
        path = shutil.which(program)
        if path is None:
            raise Failure(f"{program} is still missing after apt-get install {' '.join(missing)}")
        say(f"{program}: {path}")
    return 0
