"""msgbroker.wire against its test vectors (wire_vectors.json), both directions: a message
encodes to the vector's record and the record decodes to its fields; a dead letter becomes the
vector's ``<topic>.dlq`` record and that record reads back as the vector's letter."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgbroker
import pytest
from msgbroker import DeadLetter, Delivery, InvalidNameError, MessageContext, partition_for, spi, wire
from msgbroker._codec import check_headers, decode, encode
from msgbroker._message import GenericMessage
from msgbroker.testing import eventually
from pydantic import PrivateAttr

VECTORS = wire.vectors()
COUNT: int = VECTORS["partition_count"]
CARRIER_TIME = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
"""Stands for the broker's own timestamp of a record whose headers carry no time."""


class VectorMessage(GenericMessage):
    """A message with the vector's fields and partition key."""

    _key: str = PrivateAttr("")

    @property
    def partition_key(self) -> str:
        return self._key


def _body(record: dict[str, Any]) -> bytes:
    text = record["body"].encode("utf-8")
    assert base64.b64decode(record["body_base64"]) == text, f"{record['message_id']}: body and body_base64 differ"
    return text


def _letter(fields: dict[str, Any], fallback: datetime) -> DeadLetter:
    at = fields["dead_lettered_at"]
    return DeadLetter(
        message_id=fields["message_id"], topic=fields["topic"], group=fields["group"], partition=fields["partition"],
        error=fields["error"], attempts=fields["attempts"], headers=fields["headers"],
        payload=fields["payload"].encode("utf-8"), partition_key=fields["partition_key"],
        dead_lettered_at=datetime.fromisoformat(at) if at is not None else fallback,
    )


def _ids(kind: str) -> list[str]:
    return [v["name"] for v in VECTORS[kind]]


def test_the_vectors_ship_with_the_package_and_cover_each_case() -> None:
    assert VECTORS["version"] == 1 and COUNT == 4
    assert {"plain", "seat-lock", "unicode"} <= set(_ids("messages"))
    letters = VECTORS["dead_letters"]
    assert any("letter" not in v for v in letters), "a decode-only (older) dead letter"
    assert any(wire.REPLAY_GROUP_HEADER in v.get("letter", {}).get("headers", {}) for v in letters)
    assert any("\n" in v["record"]["headers"].get(wire.DEAD_LETTER_ERROR, "") for v in letters)


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=_ids("messages"))
def test_a_message_encodes_to_its_record(vector: dict[str, Any]) -> None:
    record = vector["record"]
    message = VectorMessage.model_validate(vector["decoded"])
    message._key = record["key"]
    encoded = encode(record["topic"], message, COUNT, 1 << 20, record["headers"])
    assert encoded.body == _body(record)
    assert (encoded.topic, encoded.message_id, encoded.key, encoded.headers) == (
        record["topic"], record["message_id"], record["key"], record["headers"])
    assert encoded.partition == record["partition"] == partition_for(record["key"], COUNT)


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=_ids("messages"))
def test_a_record_decodes_to_the_message_fields(vector: dict[str, Any]) -> None:
    record = vector["record"]
    delivery = Delivery(record["partition"], record["message_id"], record["key"], record["headers"], _body(record), 1)
    message = decode(delivery, GenericMessage)
    assert message.model_dump(mode="json") == vector["decoded"]
    assert str(message.message_id) == record["message_id"], "the body's message_id is the record's"


@pytest.mark.parametrize("vector", [v for v in VECTORS["dead_letters"] if "letter" in v],
                         ids=[v["name"] for v in VECTORS["dead_letters"] if "letter" in v])
def test_a_dead_letter_becomes_its_dlq_record(vector: dict[str, Any]) -> None:
    letter = _letter(vector["letter"], CARRIER_TIME)
    expected = vector["record"]
    assert wire.dead_letter_headers(letter) == expected["headers"]
    record = wire.dead_letter_record(letter)
    assert (record.topic, record.partition, record.key, record.message_id, record.headers, record.body) == (
        expected["topic"], expected["partition"], expected["key"], expected["message_id"], expected["headers"],
        _body(expected))
    assert record.topic == wire.dead_letter_topic(letter.topic) == f"{letter.topic}.dlq"


@pytest.mark.parametrize("vector", VECTORS["dead_letters"], ids=_ids("dead_letters"))
def test_a_dlq_record_reads_back_as_its_dead_letter(vector: dict[str, Any]) -> None:
    record = vector["record"]
    assert wire.dead_letter_group(record["headers"]) == vector["decoded"]["group"]
    topic = record["topic"].removesuffix(wire.DEAD_LETTER_TOPIC_SUFFIX)
    got = wire.dead_letter_from_record(topic, record["partition"], record["message_id"], record["key"],
                                       record["headers"], _body(record), dead_lettered_at=CARRIER_TIME)
    assert got == _letter(vector["decoded"], CARRIER_TIME)


def test_reading_a_record_that_is_no_dead_letter_says_so() -> None:
    with pytest.raises(ValueError, match="no msgbroker-dead-letter-group header"):
        wire.dead_letter_from_record("t", 0, "m-1", "k", {"tenant": "acme"}, b"{}")
    assert wire.dead_letter_group({"tenant": "acme"}) is None


def test_unreadable_numbers_and_times_fall_back() -> None:
    headers = {wire.DEAD_LETTER_GROUP: "g", wire.DEAD_LETTER_ATTEMPTS: "many", wire.DEAD_LETTER_PARTITION: "x",
               wire.DEAD_LETTER_AT: "yesterday"}
    letter = wire.dead_letter_from_record("t", 3, "m-1", "k", headers, b"{}", dead_lettered_at=CARRIER_TIME)
    assert (letter.attempts, letter.partition, letter.dead_lettered_at, letter.headers) == (0, 3, CARRIER_TIME, {})


def test_times_are_utc_iso_8601_with_the_offset() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert wire.format_time(moment) == "2026-01-02T03:04:05.678901+00:00"
    assert wire.format_time(moment.replace(tzinfo=None)) == "2026-01-02T03:04:05.678901+00:00"
    east = moment.astimezone(timezone(timedelta(hours=2)))
    assert wire.format_time(east) == "2026-01-02T03:04:05.678901+00:00"
    assert wire.parse_time("2026-01-02T03:04:05Z") == moment.replace(microsecond=0)
    assert wire.parse_time("2026-01-02T03:04:05") == moment.replace(microsecond=0)
    assert wire.parse_time("2026-01-02T05:04:05+02:00") == moment.replace(microsecond=0)
    assert wire.parse_time("") is None and wire.parse_time(None) is None and wire.parse_time("soon") is None


def test_reserved_names_are_refused_at_publish_and_others_accepted() -> None:
    reserved = VECTORS["reserved"]
    assert reserved["prefix"] == wire.RESERVED_PREFIX
    for name in reserved["refused_at_publish"]:
        assert wire.is_reserved(name), name
        with pytest.raises(InvalidNameError, match="reserved"):
            check_headers({"tenant": "acme", name: "v"})
    for name in reserved["accepted"]:
        assert not wire.is_reserved(name), name
        assert check_headers({name: "v"}) == {name: "v"}
    every = [wire.MESSAGE_ID_HEADER, wire.KEY_HEADER, wire.REPLAY_GROUP_HEADER, wire.DEAD_LETTERS_REMOVED_HEADER,
             wire.REPLY_TO_HEADER, wire.REPLY_STATUS_HEADER,
             *wire.DEAD_LETTER_HEADERS]
    assert all(wire.is_reserved(name) for name in every)
    assert not wire.is_reserved(wire.NATS_ENVELOPE_HEADER), "a NATS header, outside the user's header names"
    assert wire.user_headers({"a": "1", "msgbroker-x": "2", "MSGBROKER-Y": "3"}) == {"a": "1"}


def test_the_provider_interface_exports_the_wire_names() -> None:
    for name in wire.__all__:
        if name != "vectors":
            assert getattr(spi, name) is getattr(wire, name) and name in spi.__all__, name


async def test_publish_refuses_a_reserved_header_naming_it() -> None:
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}") as broker:
        message = VectorMessage.model_validate(VECTORS["messages"][0]["decoded"])
        for publish in (lambda h: broker.publish("t", message, headers=h),
                        lambda h: broker.publish_batch("t", [message], headers=h)):
            with pytest.raises(InvalidNameError, match="'msgbroker-replay-group'"):
                await publish({"msgbroker-replay-group": "g"})
        assert await broker.pending_count("t", "g") == 0


async def test_replay_publishes_the_user_headers_and_the_replay_group_only() -> None:
    """The replayed copy carries the original's user headers and the group it is replayed for;
    dead-lettered again, its ``<topic>.dlq`` record carries no replay group, so a reader of the
    dlq in another group is handed it."""
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=COUNT, retry_delay=0) as broker:
        seen: list[dict[str, str]] = []
        on_dlq: list[dict[str, str]] = []

        async def reject(ctx: MessageContext[GenericMessage]) -> None:
            seen.append(dict(ctx.headers))
            await ctx.nak(requeue=False, error=f"rejected #{len(seen)}")

        async def read(ctx: MessageContext[GenericMessage]) -> None:
            on_dlq.append(dict(ctx.headers))

        await broker.subscribe("t", "g", reject)
        await broker.subscribe("t.dlq", "reader", read)
        message = VectorMessage.model_validate(VECTORS["messages"][1]["decoded"])
        message._key = "k"
        await broker.publish("t", message, headers={"tenant": "acme"})
        await eventually(lambda: len(on_dlq) == 1)
        assert await broker.replay_dead_letters("t", "g") == 1
        await eventually(lambda: len(on_dlq) == 2)
        assert seen == [{"tenant": "acme"}, {"tenant": "acme", wire.REPLAY_GROUP_HEADER: "g"}]
        assert [{k: v for k, v in h.items() if not wire.is_reserved(k)} for h in on_dlq] == [{"tenant": "acme"}] * 2
        assert [h[wire.DEAD_LETTER_ERROR] for h in on_dlq] == ["rejected #1", "rejected #2"]
        assert all(wire.REPLAY_GROUP_HEADER not in h for h in on_dlq)
        letters = await broker.dead_letters("t", "g")
        assert [(x.error, dict(x.headers)) for x in letters] == [("rejected #2", {"tenant": "acme"})]
