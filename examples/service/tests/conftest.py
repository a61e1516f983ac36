"""The example's modules live in the folder above (it is not a distribution): importable here. So is
the repository root, for the new-venv helpers of ``tests.distributions.venvs`` (test_run_redis.py)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1]
ROOT = Path(__file__).resolve().parents[3]
for folder in (EXAMPLE, ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
