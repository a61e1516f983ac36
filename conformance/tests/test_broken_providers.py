"""The suite's own quality: each deliberately broken provider is failed by the cases (and the
state machine) that guard the rule it breaks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis.errors import FlakyFailure
from msgbroker_conformance import ConformanceHarness, ConformanceSuite
from msgbroker_conformance._stateful import run_machine


def _load_broken() -> Any:
    # Loaded by path: the tests run with --import-mode=importlib (no package on sys.path).
    name = "msgbroker_conformance_broken_providers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("broken_providers.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load_broken().register()


def _suite_for(scheme: str) -> ConformanceSuite:
    class BrokenHarness(ConformanceHarness):
        url = f"{scheme}://"
        local = True
        timeout_multiplier = 0.3  # a broken provider makes the suite wait out its bounds: keep them short

        def overrides(self, namespace: str) -> dict[str, Any]:
            return {"memory": {"name": f"broken-{namespace}", "claim_timeout": 0.5}}

    name = f"Broken{scheme.title().replace('-', '')}Suite"
    suite_class = type(name, (ConformanceSuite,), {"harness": BrokenHarness()})
    return suite_class()  # type: ignore[no-any-return]


BROKEN = {
    "broken-reorder": (
        ["test_order_per_partition_under_concurrency", "test_nak_requeue_holds_the_partition_and_redelivers_first"],
        "order",
    ),
    "broken-lose": (["test_delivery_attempt_counts_a_delivery_to_a_member_that_died"], "not handled"),
    "broken-duplicate": (["test_each_message_goes_to_one_member_of_a_group"], "more than once"),
    "broken-pending": (
        ["test_pending_count_counts_ready_in_flight_and_delayed"],
        "pending_count",
    ),
}


@pytest.mark.parametrize("scheme", sorted(BROKEN))
def test_the_cases_guarding_a_rule_fail_a_provider_that_breaks_it(scheme: str) -> None:
    suite = _suite_for(scheme)
    cases, says = BROKEN[scheme]
    for name in cases:
        with pytest.raises(AssertionError) as failure:
            getattr(suite, name)()
        assert says in str(failure.value), f"{name} failed {scheme} for another reason: {failure.value}"


@pytest.mark.parametrize("scheme", sorted(BROKEN))
def test_the_state_machine_fails_a_broken_provider(scheme: str) -> None:
    harness = type(_suite_for(scheme)).harness
    # Flaky: it failed, then passed on replay (timing on a loaded machine); still a failure found.
    with pytest.raises((AssertionError, FlakyFailure)) as failure:
        run_machine(harness, 20261124, profile="ci", shrink=False)
    if isinstance(failure.value, FlakyFailure):
        assert any(isinstance(e, AssertionError) for e in failure.value.exceptions), failure.value


def test_the_same_cases_pass_the_memory_provider() -> None:
    """The control: what fails the broken providers passes the provider they break."""
    suite = _suite_for("memory")
    for cases, _ in BROKEN.values():
        for name in cases:
            getattr(suite, name)()
