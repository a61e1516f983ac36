"""The whole contract suite against the built-in in-memory provider (zero skips)."""

from __future__ import annotations

from typing import Any

from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases, case_info
from msgbroker_conformance._cases import ENVIRONMENT_CAPABILITIES, missing_capability


class MemoryHarness(ConformanceHarness):
    """One in-memory broker per test (``memory://NAME`` shares it between the test's brokers)."""

    url = "memory://"
    local = True

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"memory": {"name": f"conformance-{namespace}", "claim_timeout": 0.5}}


class TestMemoryConformance(ConformanceSuite, FencingCases):
    harness = MemoryHarness()


def test_the_memory_provider_runs_every_case_without_a_skip() -> None:
    """The acceptance "zero skips": memory declares every semantic capability a case needs, and
    supplies every hook a case needs unless that case does not apply to it (no server)."""
    harness = MemoryHarness()
    for name in dir(ConformanceSuite):
        info = case_info(getattr(ConformanceSuite, name))
        if info is None:
            continue
        semantic = tuple(r for r in info.requires if r not in ENVIRONMENT_CAPABILITIES)
        assert missing_capability(harness, semantic) is None, f"{name} would be skipped for memory"
        applies = missing_capability(harness, tuple(r for r in info.requires if r in ENVIRONMENT_CAPABILITIES)) is None
        if applies:
            assert all(callable(getattr(harness, hook, None)) for hook in info.hooks), f"{name} would skip a hook"
