"""The state machine's reference model on its own: it must flag exactly what docs/semantics.md forbids."""

from __future__ import annotations

import pytest
from msgbroker import partition_for
from msgbroker_conformance._stateful import ModelViolation, ReferenceModel


def _model(*messages: tuple[str, str, int]) -> ReferenceModel:
    model = ReferenceModel(partitions=4, max_attempts=3)
    for message_id, key, seq in messages:
        model.publish(message_id, key, seq)
    return model


def test_a_later_message_of_a_partition_may_not_overtake_an_unsettled_one() -> None:
    model = _model(("m1", "k", 0), ("m2", "k", 1))
    with pytest.raises(ModelViolation, match="before the earlier k#0"):
        model.deliver("m2", "a", 1, 0.0)
    model.deliver("m1", "a", 1, 0.0)
    with pytest.raises(ModelViolation, match="before the earlier k#0"):
        model.deliver("m2", "a", 1, 0.0)  # m1 is in flight, not settled
    model.settle("m1", "ack", dead=False)
    model.deliver("m2", "a", 1, 0.0)


def test_other_partitions_flow_independently() -> None:
    other = next(k for k in (f"x{i}" for i in range(100)) if partition_for(k, 4) != partition_for("k", 4))
    model = _model(("m1", "k", 0), ("m2", other, 0))
    model.deliver("m1", "a", 1, 0.0)
    model.deliver("m2", "b", 1, 0.0)


def test_a_message_in_flight_at_one_member_may_not_reach_another() -> None:
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    with pytest.raises(ModelViolation, match="while a still handles it"):
        model.deliver("m1", "b", 2, 0.0)


def test_a_crash_frees_what_the_member_held_and_relaxes_attempts() -> None:
    model = _model(("m1", "k", 0), ("m2", "k", 1))
    model.deliver("m1", "a", 1, 0.0)
    model.forget_holder("a")
    model.deliver("m1", "b", 3, 0.0)  # prefetched deliveries may have been counted too
    with pytest.raises(ModelViolation, match="attempts must grow"):
        model.forget_holder("b")
        model.deliver("m1", "c", 3, 0.0)


def test_attempts_are_exact_without_membership_changes() -> None:
    model = _model(("m1", "k", 0))
    with pytest.raises(ModelViolation, match="delivery_attempt 2"):
        model.deliver("m1", "a", 2, 0.0)
    model.deliver("m1", "a", 1, 0.0)
    model.settle("m1", "nak", dead=False)
    with pytest.raises(ModelViolation, match="delivery_attempt 3"):
        model.deliver("m1", "a", 3, 0.0)


def test_acked_and_dead_messages_never_come_back() -> None:
    model = _model(("m1", "k", 0), ("m2", "j", 0))
    model.deliver("m1", "a", 1, 0.0)
    model.settle("m1", "ack", dead=False)
    with pytest.raises(ModelViolation, match="again after it was acked"):
        model.deliver("m1", "a", 2, 0.0)
    model.deliver("m2", "a", 1, 0.0)
    model.settle("m2", "reject", dead=True)
    with pytest.raises(ModelViolation, match="after it was dead-lettered"):
        model.deliver("m2", "a", 2, 0.0)


def test_an_ack_lost_with_its_member_may_come_back_once_as_a_duplicate() -> None:
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    model.settle("m1", "ack", dead=False)
    model.forget_holder("a")
    assert model.unsettled() == (0, 1)
    model.deliver("m1", "b", 2, 0.0)
    assert model.duplicates == 1


def test_a_letter_whose_ack_was_lost_stays_listed_while_the_message_comes_back() -> None:
    """Rejected, then the member died before its buffered ack reached the broker: the letter is
    stored and stays listed while the message is delivered again. A delay of it is then no dead
    letter, and whether a nak dead-lettered it again cannot be told from the listing."""
    model = _model(("m1", "k", 0), ("m2", "j", 0))
    for message_id in ("m1", "m2"):
        model.deliver(message_id, "a", 1, 0.0)
        model.settle(message_id, "reject", dead=True)
    model.forget_holder("a")
    model.deliver("m1", "b", 2, 0.0)
    model.settle("m1", "delay", dead=True, not_before=1.0)  # the old letter is still listed
    model.deliver("m1", "b", 3, 2.0)
    model.deliver("m2", "b", 2, 0.0)
    model.settle("m2", "nak", dead=True)
    model.deliver("m2", "c", 3, 0.0)  # it was retried, not dead-lettered again: legal
    model.settle("m2", "ack", dead=False)
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    with pytest.raises(ModelViolation, match="dead-lettered on a delay"):
        model.settle("m1", "delay", dead=True, not_before=1.0)  # no earlier letter: a real one


def test_a_member_that_dies_before_its_ack_is_sent_may_count_as_a_failure() -> None:
    """Handled and acked, then the member died before its buffered ack reached the broker: the
    message comes again, and for the broker that delivery went to a member that died (rule 3),
    so it may count toward max_retry_attempts — as the death of the member before it did."""
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    model.forget_holder("a")  # died holding it: one exposure
    model.deliver("m1", "b", 2, 0.0)
    model.settle("m1", "ack", dead=False)
    model.forget_holder("b")  # died before the ack went out: it comes again
    model.deliver("m1", "c", 3, 0.0)
    model.settle("m1", "nak", dead=True)  # 1 failure + 2 deaths = 3: legal
    model = _model(("m1", "k", 0))
    model.deliver("m1", "b", 1, 0.0)
    model.settle("m1", "ack", dead=False)
    model.forget_holder("b")
    model.deliver("m1", "c", 2, 0.0)
    with pytest.raises(ModelViolation, match="fewer than max_retry_attempts=3"):
        model.settle("m1", "nak", dead=True)  # 1 failure + 1 death: still too early


def test_naks_dead_letter_exactly_at_max_attempts() -> None:
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    with pytest.raises(ModelViolation, match="fewer than max_retry_attempts=3"):
        model.settle("m1", "nak", dead=True)
    model = _model(("m1", "k", 0))
    for attempt in (1, 2):
        model.deliver("m1", "a", attempt, 0.0)
        model.settle("m1", "nak", dead=False)
    model.deliver("m1", "a", 3, 0.0)
    with pytest.raises(ModelViolation, match="still not dead-lettered"):
        model.settle("m1", "nak", dead=False)


def test_reject_must_dead_letter_and_delay_must_wait() -> None:
    model = _model(("m1", "k", 0), ("m2", "j", 0))
    model.deliver("m1", "a", 1, 0.0)
    with pytest.raises(ModelViolation, match="not among the dead letters"):
        model.settle("m1", "reject", dead=False)
    model.deliver("m2", "a", 1, 0.0)
    model.settle("m2", "delay", dead=False, not_before=100.0)
    with pytest.raises(ModelViolation, match="before its delay ended"):
        model.deliver("m2", "a", 2, 99.0)
    model.deliver("m2", "a", 2, 100.0)


def test_pending_counts_ready_and_in_flight_only() -> None:
    model = _model(("m1", "k", 0), ("m2", "k", 1), ("m3", "j", 0))
    assert model.unsettled() == (3, 0)
    model.deliver("m1", "a", 1, 0.0)
    assert model.unsettled() == (3, 0)
    model.settle("m1", "ack", dead=False)
    model.deliver("m3", "a", 1, 0.0)
    model.settle("m3", "reject", dead=True)
    assert model.unsettled() == (1, 0)
    assert model.expects_delivery()


def test_an_unexplained_dead_letter_is_legal_only_after_enough_failures_and_crashes() -> None:
    """A graceful hand-over costs no attempt (docs/semantics.md, rule 3): a message that failed
    once and was delayed while members joined and left may not be dead-lettered unhandled; one
    that failed once while two members died holding it (max_retry_attempts=3) may."""
    model = _model(("m1", "k", 0))
    model.deliver("m1", "a", 1, 0.0)
    model.settle("m1", "nak", dead=False)
    model.deliver("m1", "a", 2, 0.0)
    model.settle("m1", "delay", dead=False, not_before=0.0)
    model.disturb()  # a join, a graceful leave
    assert model.dead_without_handler("m1") is False
    model.forget_holder("gone-1")
    model.forget_holder("gone-2")
    assert model.dead_without_handler("m1") is True


def _blocked_for(package: str) -> tuple[list[float], str | None]:
    import asyncio
    import time

    from msgbroker_conformance._volume import StallWatch

    stalls: list[float] = []

    async def run() -> str | None:
        watch = StallWatch(lambda end, lag: stalls.append(lag), 0.1, package)
        watching = asyncio.create_task(watch.run())
        await asyncio.sleep(0.05)
        time.sleep(0.6)  # noqa: ASYNC251 - the code under test holds the event loop
        await asyncio.sleep(0.05)
        watching.cancel()
        return watch.blocking()

    return stalls, asyncio.run(run())


def test_a_stall_in_the_providers_own_code_is_its_failure_with_the_stack() -> None:
    stalls, blocked = _blocked_for("conformance/tests/")
    assert stalls and max(stalls) >= 0.5
    assert blocked is not None and "time.sleep(0.6)" in blocked, blocked


def test_a_stall_elsewhere_is_measured_but_blames_no_provider() -> None:
    stalls, blocked = _blocked_for("msgbroker_some_provider/")
    assert stalls and max(stalls) >= 0.5
    assert blocked is None


def test_a_failure_seen_once_is_reported_as_the_providers_not_as_flaky() -> None:
    """Hypothesis raises FlakyFailure when a failing example passes on its replay (other timing);
    the suite reports the violation itself, with the steps, as a ConformanceFailure."""
    from hypothesis.errors import FlakyFailure
    from msgbroker_conformance import ConformanceFailure
    from msgbroker_conformance._stateful import ModelViolation, _once_seen

    violation = ModelViolation("b#4 has delivery_attempt 2; it was handled 0 time(s)")
    flaky = FlakyFailure("Hypothesis run_state_machine(...) produces unreliable results", [violation])
    flaky.add_note("state.publish(key='b', n=1)")
    failure = _once_seen(flaky)
    assert isinstance(failure, ConformanceFailure) and not isinstance(failure, FlakyFailure)
    assert str(failure).startswith("ModelViolation: b#4 has delivery_attempt 2; it was handled 0 time(s) — seen once")
    assert failure.__notes__ == ["state.publish(key='b', n=1)"]


def test_a_crash_after_the_last_allowed_failure_but_one_lets_the_message_be_dead_lettered_unhandled() -> None:
    """The volume model: a message failed max_retry_attempts - 1 times and waited for its next
    delivery when a member died (it may have read it ahead, and the broker counted that
    delivery): the next owner may dead-letter it unhandled ("delivered N times without being
    settled") and hand the next message of its partition. Flagged as an order violation before
    (RabbitMQ, seed 867987651 of the volume case)."""
    from msgbroker_conformance._volume import VolumeModel

    model = VolumeModel(partitions=4, max_attempts=4)
    model.publish("m1", "k", 0, disturbed=False)
    model.publish("m2", "k", 1, disturbed=False)
    partition = partition_for("k", 4)
    for attempt in (1, 2, 3):
        model.deliver("m1", "a", partition, attempt, 0.0)
        model.settle("m1", "raise")
    model.crashed("b")  # m1 waits for its fourth delivery meanwhile
    model.deliver("m2", "a", partition, 1, 0.0)  # m1 was dead-lettered as delivered 5 times
    model.judge_dead_letters({"m1": 1})
    assert model.violations == []
    unexposed = VolumeModel(partitions=4, max_attempts=4)
    unexposed.publish("m1", "k", 0, disturbed=False)
    unexposed.publish("m2", "k", 1, disturbed=False)
    for attempt in (1, 2, 3):
        unexposed.deliver("m1", "a", partition, attempt, 0.0)
        unexposed.settle("m1", "raise")
    unexposed.deliver("m2", "a", partition, 1, 0.0)
    assert unexposed.violations and "before the earlier k#0" in unexposed.violations[0]
