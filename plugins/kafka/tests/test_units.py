"""The Kafka provider's pure parts: URL, commit metadata, the pinning assignor, error mapping."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgbroker
from aiokafka import errors as kafka_errors
from aiokafka.structs import TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from msgbroker_kafka import AttemptRecord, KafkaTransport, assign_members
from msgbroker_kafka._assignor import decode_pin, encode_pin
from msgbroker_kafka._consumer import _Track, next_attempt
from msgbroker_kafka._errors import map_error


def test_url_names_the_bootstrap_servers() -> None:
    broker = msgbroker.connect("kafka://h1:9092,h2:9093")
    assert broker.provider == "kafka"
    assert broker.settings.kafka.bootstrap_servers == "h1:9092,h2:9093"
    assert KafkaTransport.settings_from_url("kafka://") == {}


@given(
    st.integers(0, 10_000),
    st.one_of(st.none(), st.floats(0, 4e9, allow_nan=False)),
    st.lists(st.tuples(st.integers(1, 50), st.integers(0, 9)), max_size=8),
    st.one_of(st.none(), st.tuples(st.integers(0, 100), st.integers(1, 100))),
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 50)), max_size=4),
)
def test_attempt_records_round_trip(
    started: int, not_before: float | None, steps: list[tuple[int, int]], failed: tuple[int, int] | None,
    gaps: list[tuple[int, int]],
) -> None:
    runs, first = [], 100
    for length, count in steps:
        runs.append((first, count))
        first += length
    doubt, at = [], 100
    for gap, length in gaps:
        doubt.append((at + gap, at + gap + length))
        at += gap + length + 1
    failures, retried_at = failed if failed else (None, 0)
    record = AttemptRecord(started, not_before, tuple(runs), first if runs else None, due=not_before is not None,
                           failures=failures, retried_at=retried_at, doubt=tuple(doubt))
    decoded = AttemptRecord.decode(record.encode())
    assert decoded is not None
    assert (decoded.started, decoded.runs, decoded.until, decoded.due, decoded.failures, decoded.retried_at,
            decoded.doubt) == (
        record.started, record.runs, record.until, record.due, record.failures, record.retried_at, record.doubt
    )
    assert (decoded.not_before is None) == (not_before is None)
    if not_before is not None and decoded.not_before is not None:
        assert abs(decoded.not_before - not_before) < 0.001


def test_an_attempt_record_counts_the_committed_offset_and_the_runs_after_it() -> None:
    record = AttemptRecord(2, None, ((11, 1), (13, 3), (14, 0), (16, 1)), 17)
    assert [record.began(10, o) for o in range(9, 19)] == [0, 2, 1, 1, 3, 0, 0, 1, 0, 0]


def test_an_attempt_record_says_which_offsets_are_in_doubt() -> None:
    record = AttemptRecord(0, doubt=((10, 13), (15, 16)))
    assert [o for o in range(8, 18) if record.doubtful(o)] == [10, 11, 12, 15]
    assert record.end(10) == 16
    assert AttemptRecord(1, runs=((11, 2),), until=20).end(10) == 20
    assert AttemptRecord(1).end(10) == 11


def test_foreign_commit_metadata_is_ignored() -> None:
    assert AttemptRecord.decode("") is None
    assert AttemptRecord.decode("written by another tool") is None
    assert AttemptRecord.decode("msgbroker:a=x") is None


def test_next_attempt_counts_the_deliveries_that_began_and_keeps_a_pending_delay() -> None:
    plain = AttemptRecord(1)
    assert next_attempt(plain, 1, True, now=100.0) == (2, None)  # delivered once, its owner died
    delayed = AttemptRecord(2, 150.0)  # two began; the drained owner left a delay to wait out
    assert next_attempt(delayed, 2, True, now=100.0) == (3, 150.0)
    assert next_attempt(delayed, 2, True, now=200.0) == (3, None)
    due = AttemptRecord(3, 150.0, due=True)  # attempt 3 was due at 150 on the owner that died
    assert next_attempt(due, 3, True, now=100.0) == (3, 150.0)  # it died before: 3 never began
    assert next_attempt(due, 3, True, now=200.0) == (4, None)  # it may have begun
    assert next_attempt(due, 1, False, now=100.0) == (2, None)  # a later offset: no delay of its own
    assert next_attempt(AttemptRecord(0), 0, True, now=100.0, doubt=True) == (2, None)  # handed, maybe acked


@dataclass
class _Record:
    """A fetched Kafka record, as much of it as a delivery needs."""

    offset: int
    partition: int = 0
    key: bytes = b"k"
    value: bytes = b"{}"
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def _owner(metadata: str | None = None, at: int = 0, marks: tuple[tuple[int, int], ...] = ()) -> _Track:
    """A partition's track as a new owner opens it after a commit at ``at`` with ``metadata``
    and the start markers (``marks``) its previous owner wrote after that commit."""
    track = _Track(TopicPartition("t", 0))
    if metadata is not None:
        track.inherit(at, metadata, marks)
    return track


def test_first_deliveries_are_committed_in_doubt_and_a_crash_counts_them_once_and_no_failure() -> None:
    first = _owner()
    for offset in range(5):
        first.deliver(_Record(offset))
    assert first.record(0) == "msgbroker:a=0;d=0-5"  # committed before they are handed out
    for offset in (0, 1):
        del first.pending[offset]  # acked; the acks are not committed yet when the owner dies
    assert first.record(first.target() or 0) == "msgbroker:a=0;d=2-5"
    second = _owner("msgbroker:a=0;d=0-5")  # what the dead owner last committed
    again = [second.deliver(_Record(offset)) for offset in range(5)]
    assert [(d.attempt, d.failures) for d in again] == [(2, 0)] * 5, "one attempt more, no failure"
    assert second.careful == set(range(5)), "redeliveries are handled carefully"
    # the head is in its handler: its start is exact now; what follows is still in doubt
    assert AttemptRecord.decode(second.record(0)) == AttemptRecord(2, failures=0, retried_at=2, doubt=((1, 5),))
    third = _owner(second.record(0))  # the second owner died in the head's handler: that counts
    head, *rest = [third.deliver(_Record(offset)) for offset in range(5)]
    assert (head.attempt, head.failures) == (3, 1)
    assert [(d.attempt, d.failures) for d in rest] == [(2, 0)] * 4, "doubt does not pile up"


def test_a_commit_names_where_the_start_markers_begin_and_a_new_owner_counts_them_in_doubt() -> None:
    first = _owner()
    first.marked = 40  # <topic>.starts ended at 40 when it took the partition over
    for offset in range(3):
        first.deliver(_Record(offset))
    assert first.record(0) == "msgbroker:a=0;d=0-3;m=40"
    assert first.record(0, final=True) == "msgbroker:a=1;m=40"
    first.pending.clear()
    assert first.record(3) == "msgbroker:a=0;m=40"  # nothing in doubt, the markers' start still named
    assert AttemptRecord.decode("msgbroker:a=0;m=40") == AttemptRecord(0, marks=40)
    # it handed 3-5 with a marker (not committed) and died: the next owner reads the marker
    second = _owner("msgbroker:a=0;m=40", at=3, marks=((3, 5), (1, 2)))
    again = [second.deliver(_Record(offset)) for offset in range(3, 7)]
    assert [(d.attempt, d.failures) for d in again] == [(2, 0), (2, 0), (1, None), (1, None)], (
        "handed out after the commit: one attempt more, no failure; published later: a first delivery")
    assert second.careful == {3, 4}
    # markers and the record's own doubt together
    both = _owner("msgbroker:a=0;d=3-4;m=40", at=3, marks=((4, 6),))
    assert both.inherited is not None and both.inherited.doubt == ((3, 6),)


def test_a_final_record_leaves_no_doubt_of_its_own() -> None:
    track = _owner()
    for offset in range(3):
        track.deliver(_Record(offset))
    # drained (close or revoke) with the head cut short in its handler: it counts, the rest never began
    assert track.record(0, final=True) == "msgbroker:a=1"
    redelivered = _owner("msgbroker:a=0;d=0-3")
    for offset in range(3):
        redelivered.deliver(_Record(offset))
    # drained with the head cut short again: exact now (a failure for the next owner); what followed
    # it never began here, so the previous owner's doubt stands as it was
    assert AttemptRecord.decode(redelivered.record(0, final=True)) == AttemptRecord(
        2, failures=0, retried_at=2, doubt=((1, 3),)
    )


def test_assignor_spreads_and_keeps_pinned_partitions_exclusive() -> None:
    plan = assign_members({"t": range(4)}, {"a": (["t"], None), "b": (["t"], None), "p": (["t"], 2), "q": (["t"], 2)})
    assert plan["p"] == {"t": [2]}
    assert plan["q"] == {}
    assert sorted(plan["a"]["t"] + plan["b"]["t"]) == [0, 1, 3]
    held = assign_members({"t": range(4)}, {"p": (["t"], 2), "q": (["t"], 2)}, holding=["q"])
    assert held["q"] == {"t": [2]} and held["p"] == {}, "the member holding a pinned partition keeps it"


def test_assignor_gives_each_topic_to_its_own_subscribers() -> None:
    plan = assign_members({"x": range(2), "y": range(2)}, {"a": (["x"], None), "b": (["y"], None)})
    assert plan == {"a": {"x": [0, 1]}, "b": {"y": [0, 1]}}


def test_pin_user_data_round_trips() -> None:
    assert decode_pin(encode_pin(7, True, 123)) == (7, True, 123)
    assert decode_pin(encode_pin(7, False)) == (7, False, 0)
    assert decode_pin(encode_pin(None, False)) == (None, False, 0)
    assert decode_pin(b"garbage") == (None, False, 0)


def test_the_first_to_pin_a_partition_gets_it_when_nobody_holds_it() -> None:
    plan = assign_members({"t": range(2)}, {"a": (["t"], 1), "b": (["t"], 1)}, since={"a": 20, "b": 10})
    assert plan["b"] == {"t": [1]} and plan["a"] == {}


def test_native_errors_map_into_the_tree() -> None:
    assert isinstance(map_error(kafka_errors.KafkaConnectionError("x"), "y"), msgbroker.BrokerConnectionError)
    assert isinstance(map_error(kafka_errors.KafkaTimeoutError(), "y", publishing=True),
                      msgbroker.PublishIndeterminateError)
    assert isinstance(map_error(kafka_errors.MessageSizeTooLargeError(), "y", publishing=True),
                      msgbroker.MessageTooLargeError)
    assert isinstance(map_error(kafka_errors.TopicAuthorizationFailedError(), "y"), msgbroker.ConfigurationError)
    assert msgbroker.is_transient(map_error(kafka_errors.NotLeaderForPartitionError(), "y"))
