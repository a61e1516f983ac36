"""``python -m msgbroker_bench``."""

from __future__ import annotations

from . import main

main()
