"""The suite's own quality (mutation testing): each deliberately broken provider of
broken_providers.py is failed by the case that guards the rule it breaks, for the reason that
rule gives; the same cases pass the providers they break (the controls).

``MSGBROKER_CONFORMANCE_KILL_MATRIX=PATH`` also runs every case of the suite against every
broken provider and writes which cases killed which (docs/conformance.md shows the result)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from msgbroker_conformance import ConformanceHarness, ConformanceSuite, FencingCases
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


broken = _load_broken()
broken.register()


def _suite_for(scheme: str, volume: int | None = None) -> ConformanceSuite:
    class BrokenHarness(ConformanceHarness):
        url = f"{scheme}://"
        local = True
        timeout_multiplier = 0.5  # a broken provider makes the suite wait out its bounds: keep them short
        dedup_window = 3.0  # repeats are judged only when inside the window: room for a loaded machine

        def overrides(self, namespace: str) -> dict[str, Any]:
            return {"memory": {"name": f"broken-{namespace}", "claim_timeout": 0.5}}

    if volume is not None:
        BrokenHarness.volume = volume
    name = f"Broken{scheme.title().replace('-', '')}Suite"
    suite_class = type(name, (ConformanceSuite, FencingCases), {"harness": BrokenHarness()})
    return suite_class()  # type: ignore[no-any-return]


HAND_OVER = "test_a_hand_over_during_a_delay_costs_no_attempt"
ENVELOPE = "test_the_envelope_survives_retries_and_a_hand_over"
LETTERS = "test_dead_letters_are_listed_oldest_first_with_their_keys"
PENDING = "test_pending_count_is_per_group_and_counts_before_the_first_subscribe"
DEDUP = "test_dedup_drops_a_repeat_inside_the_window_only"
SCHEDULED = "test_a_scheduled_message_waits_without_blocking_its_partition_then_takes_its_place"

BROKEN: dict[str, list[tuple[str, str]]] = {
    # scheme: [(the case that must fail it, what its failure must say)]
    "broken-reorder": [("test_order_per_partition_under_concurrency", "order"),
                       ("test_nak_requeue_holds_the_partition_and_redelivers_first", "order")],
    "broken-lose": [("test_delivery_attempt_counts_a_delivery_to_a_member_that_died", "not handled")],
    "broken-duplicate": [("test_each_message_goes_to_one_member_of_a_group", "more than once")],
    "broken-pending": [("test_pending_count_counts_ready_in_flight_and_delayed", "pending_count")],
    "broken-delay-handover": [(HAND_OVER, "before its 1.0s delay ended")],
    "broken-delay-broker": [(HAND_OVER, "before its 1.0s delay ended")],
    "broken-attempt-reset": [(HAND_OVER, "expected the delay to cost no attempt"), (ENVELOPE, "handlings")],
    "broken-letter-key": [(LETTERS, "partition key"), (ENVELOPE, "partition key")],
    "broken-letters-order": [(LETTERS, "oldest first")],
    "broken-redelivery-headers": [(ENVELOPE, "second's delivery attempt 3 of message 0 carries header")],
    "broken-long-headers": [(ENVELOPE, "(255 characters; published 4000)")],
    "broken-record-key": [(LETTERS, "partition key"), (ENVELOPE, "partition key")],
    "broken-large-drop": [(ENVELOPE, "the big message's dead letter")],
    "broken-pending-new-group": [(PENDING, "pending_count to be 5")],
    "broken-pending-groups": [(PENDING, "pending_count to be 5")],
    "broken-dedup-batch": [(DEDUP, "twice in one publish_batch")],
    "broken-dedup-window": [(DEDUP, "inside the 3.0s window")],
    "broken-fencing": [("test_a_member_that_lost_its_lease_cannot_settle", "it is lost")],
    "broken-late-handover": [("test_partitions_move_when_a_member_stops_heartbeating", "the survivor to own")],
    # a lost message shows as the next one of its partition handed before it (or, last in its
    # partition, as "lost" at the end)
    "broken-reorder-rare": [("test_volume_against_the_reference_model", "before the earlier")],
    "broken-lose-rare": [("test_volume_against_the_reference_model", "lost")],
    "broken-replay-by-id": [("test_a_replay_removes_only_the_letters_it_listed", "must stay")],
    "broken-describe-shifted": [("test_describe_matches_the_model", "pending per partition")],
    "broken-describe-ghost": [("test_describe_matches_the_model", "are not all live members")],
    "broken-reply-cut": [("test_a_request_is_answered_by_what_its_handler_returns", "cannot decode the reply")],
    "broken-schedule-early": [(SCHEDULED, "before its time")],
    "broken-schedule-cancel": [("test_a_cancelled_scheduled_message_is_never_delivered", "was delivered")],
}
"""Every broken provider, with the case that catches it: the list covers every item of issue
#21 and every rule a broken provider of this module breaks."""

CONTROLS: dict[str, str] = {"broken-delay-broker": "memory-broker-redelivery"}
"""A broken provider whose unbroken twin is not plain memory."""


def test_every_broken_provider_is_listed() -> None:
    assert sorted(t.NAME for t in broken.BROKEN_TRANSPORTS) == sorted(BROKEN)


def _fails(suite: ConformanceSuite, case: str, says: str, scheme: str) -> None:
    with pytest.raises(AssertionError) as failure:
        getattr(suite, case)()
    assert says in str(failure.value), f"{case} failed {scheme} for another reason: {failure.value}"


@pytest.mark.parametrize("scheme", sorted(BROKEN))
def test_the_cases_guarding_a_rule_fail_a_provider_that_breaks_it(scheme: str) -> None:
    broken.set_seed(20261204)
    suite = _suite_for(scheme, volume=6000)
    for case, says in BROKEN[scheme]:
        _fails(suite, case, says, scheme)


@pytest.mark.parametrize("scheme", ["memory", *sorted(set(CONTROLS.values()))])
def test_the_same_cases_pass_the_providers_they_break(scheme: str) -> None:
    """The control: what fails the broken providers passes the provider they break."""
    suite = _suite_for(scheme, volume=2000)
    twins = [b for b, control in CONTROLS.items() if control == scheme] if scheme != "memory" else \
        [b for b in BROKEN if b not in CONTROLS]
    for case in sorted({case for b in twins for case, _ in BROKEN[b]}):
        getattr(suite, case)()


@pytest.mark.parametrize("scheme", ["broken-reorder", "broken-lose", "broken-duplicate", "broken-pending"])
def test_the_state_machine_fails_a_broken_provider(scheme: str) -> None:
    harness = type(_suite_for(scheme)).harness
    # A failure that did not repeat on replay (timing on a loaded machine) is still reported as
    # the provider's failure (ConformanceFailure, an AssertionError), never as Hypothesis's Flaky.
    with pytest.raises(AssertionError):
        run_machine(harness, 20261124, profile="ci", shrink=False)


@pytest.mark.skipif(not os.environ.get("MSGBROKER_CONFORMANCE_KILL_MATRIX"),
                    reason="the kill matrix runs every case against every broken provider (minutes): "
                           "set MSGBROKER_CONFORMANCE_KILL_MATRIX=PATH")
@pytest.mark.timeout(1800)
def test_kill_matrix() -> None:
    """Every case against every broken provider: which cases kill which (written as JSON)."""
    left_out = ("test_state_machine_against_the_reference_model", "test_reconnect_after_server_restart")
    cases = sorted(n for n in {*dir(ConformanceSuite), *dir(FencingCases)}
                   if n.startswith("test_") and n not in left_out)
    matrix: dict[str, dict[str, str]] = {}
    for scheme in sorted(BROKEN):
        broken.set_seed(20261204)
        suite = _suite_for(scheme, volume=6000)
        row = matrix[scheme] = {}
        for case in cases:
            started = time.monotonic()
            try:
                getattr(suite, case)()
            except pytest.skip.Exception:
                row[case] = "skipped"
            except AssertionError as exc:
                row[case] = f"killed ({time.monotonic() - started:.1f}s): {str(exc).splitlines()[0][:200]}"
            else:
                row[case] = "passed"
    Path(os.environ["MSGBROKER_CONFORMANCE_KILL_MATRIX"]).write_text(json.dumps(matrix, indent=2) + "\n")
    survivors = [s for s, row in matrix.items() if not any(v.startswith("killed") for v in row.values())]
    assert not survivors, f"broken providers no case killed: {survivors}"


def _volume_run(scheme: str, seed: int, size: int) -> None:
    import asyncio

    from msgbroker_conformance import Scenario
    from msgbroker_conformance._volume import run_volume

    harness = type(_suite_for(scheme)).harness
    broken.set_seed(seed)

    async def run() -> None:
        scenario = Scenario(harness, seed)
        try:
            await run_volume(scenario, size)
        finally:
            await scenario.close()

    asyncio.run(run())


RARE_SEEDS = int(os.environ.get("MSGBROKER_CONFORMANCE_RARE_SEEDS", "2"))
"""Seeds per low-rate bug (20 for the acceptance run: docs/conformance.md has the command)."""


@pytest.mark.parametrize("scheme", ["broken-reorder-rare", "broken-lose-rare", "memory"])
def test_the_volume_tier_catches_low_rate_bugs_with_every_seed(scheme: str) -> None:
    """A swap of two messages in one batch in 50, a loss in 1,000: caught with every seed at
    6,000 messages; the memory provider passes the same seeds (no false alarm)."""
    caught: dict[int, str] = {}
    for seed in range(1, RARE_SEEDS + 1):
        try:
            _volume_run(scheme, seed, 6000)
        except AssertionError as exc:
            caught[seed] = str(exc)
    if scheme == "memory":
        assert not caught, f"the memory provider failed the volume tier: {caught}"
    else:
        missed = sorted(set(range(1, RARE_SEEDS + 1)) - set(caught))
        assert not missed, f"{scheme} passed the volume tier with seeds {missed}"
        wrong = {seed: text for seed, text in caught.items() if "before the earlier" not in text and "lost" not in text}
        assert not wrong, f"{scheme} failed for another reason: {wrong}"
