"""The whole msgbroker contract suite against the SQLite provider (one database file per test)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite

_DIRECTORY = Path(tempfile.mkdtemp(prefix="msgbroker-sqlite-conformance-"))
atexit.register(shutil.rmtree, _DIRECTORY, True)


class SqliteHarness(ConformanceHarness):
    url = "sqlite://"
    timeout_multiplier = 2.0  # every poll goes through the file: leave some slack

    def overrides(self, namespace: str) -> dict[str, Any]:
        path = _DIRECTORY / f"{namespace}.db"  # a database per test: nothing to clean between tests
        return {"sqlite": {"path": str(path), "claim_timeout": 1}}


class TestSqliteConformance(ConformanceSuite):
    harness = SqliteHarness()
