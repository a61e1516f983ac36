"""The whole contract suite against the built-in in-memory provider (zero skips)."""

from __future__ import annotations

from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite


class MemoryHarness(ConformanceHarness):
    """One in-memory broker per test (``memory://NAME`` shares it between the test's brokers)."""

    url = "memory://"
    local = True

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"memory": {"name": f"conformance-{namespace}", "claim_timeout": 0.5}}


class TestMemoryConformance(ConformanceSuite):
    harness = MemoryHarness()
