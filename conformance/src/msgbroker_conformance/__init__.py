"""msgbroker-conformance: the contract suite every msgbroker provider runs (the contract of docs/semantics.md).

A provider's ``tests/test_conformance.py``::

    from msgbroker_conformance import ConformanceHarness, ConformanceSuite

    class MyHarness(ConformanceHarness):
        url = os.environ.get("MSGBROKER_MYBROKER__URL")
        def overrides(self, namespace):
            return {"mybroker": {"prefix": f"conf-{namespace}"}}

    class TestMyConformance(ConformanceSuite):
        harness = MyHarness()

See docs/writing-a-provider.md.
"""

from __future__ import annotations

from ._cases import TIERS, CaseInfo, case, case_info, requires, requires_hook, session_seed
from ._harness import FAULT_HOOKS, ConformanceHarness, OptionHarness, load_harness
from ._schedule_cases import ScheduleCases
from ._suite import ConformanceSuite, FencingCases
from ._support import (
    ConformanceFailure,
    ConformanceMessage,
    Recorder,
    Scenario,
    Seen,
    eventually,
    keys_in_partition,
)

__version__ = "0.1.0"

__all__ = [
    "FAULT_HOOKS",
    "TIERS",
    "CaseInfo",
    "ConformanceFailure",
    "ConformanceHarness",
    "ConformanceMessage",
    "ConformanceSuite",
    "FencingCases",
    "OptionHarness",
    "Recorder",
    "Scenario",
    "ScheduleCases",
    "Seen",
    "__version__",
    "case",
    "case_info",
    "eventually",
    "keys_in_partition",
    "load_harness",
    "requires",
    "requires_hook",
    "session_seed",
]
