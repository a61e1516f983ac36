"""The Kafka provider's pure parts: URL, commit metadata, the pinning assignor, error mapping."""

from __future__ import annotations

import msgbroker
from aiokafka import errors as kafka_errors
from hypothesis import given
from hypothesis import strategies as st
from msgbroker_kafka import KafkaTransport, assign_members, format_attempts, parse_attempts
from msgbroker_kafka._assignor import decode_pin, encode_pin
from msgbroker_kafka._consumer import next_attempt
from msgbroker_kafka._errors import map_error


def test_url_names_the_bootstrap_servers() -> None:
    broker = msgbroker.connect("kafka://h1:9092,h2:9093")
    assert broker.provider == "kafka"
    assert broker.settings.kafka.bootstrap_servers == "h1:9092,h2:9093"
    assert KafkaTransport.settings_from_url("kafka://") == {}


@given(st.integers(1, 10_000), st.one_of(st.none(), st.floats(0, 4e9, allow_nan=False)))
def test_attempt_metadata_round_trips(started: int, not_before: float | None) -> None:
    parsed = parse_attempts(format_attempts(started, not_before))
    assert parsed is not None
    assert parsed[0] == started
    assert (parsed[1] is None) == (not_before is None)
    if not_before is not None and parsed[1] is not None:
        assert abs(parsed[1] - not_before) < 0.001


def test_foreign_commit_metadata_is_ignored() -> None:
    assert parse_attempts("") is None
    assert parse_attempts("written by another tool") is None
    assert parse_attempts("msgbroker:a=x") is None


def test_next_attempt_counts_the_deliveries_that_began_and_keeps_a_pending_delay() -> None:
    assert next_attempt(1, None, now=100.0) == (2, None)  # delivered once, its owner died
    assert next_attempt(2, 150.0, now=100.0) == (3, 150.0)  # nak'ed with a delay: attempt 3 at 150
    assert next_attempt(2, 150.0, now=200.0) == (3, None)


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
