"""What the fast paths of publish and consume must keep: message ids, partition keys, headers,
and the in-memory provider's fencing (its answers are cached until a lease changes hands)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import msgbroker
import pytest
from msgbroker import InvalidNameError, Lane, Message, MessageContext, partition_for
from msgbroker._codec import encode, validate_name
from msgbroker._message import _uuid4
from msgbroker.testing import eventually


class Keyed(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


class Plain(Message):
    note: str = ""


def test_generated_message_ids_are_random_version_4_uuids() -> None:
    ids = [_uuid4() for _ in range(2000)] + [Plain().message_id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids[:50] + ids[-50:]:
        assert isinstance(value, uuid.UUID)
        assert value.version == 4 and value.variant == uuid.RFC_4122
        same = uuid.UUID(str(value))
        assert same == value and hash(same) == hash(value) and same.int == value.int
    message = Plain()
    assert Plain.model_validate_json(message.model_dump_json()) == message


def test_the_default_partition_key_is_the_message_id() -> None:
    message = Plain()
    record = encode("t", message, 16, 1 << 20)
    assert record.key == record.message_id == str(message.message_id) == message.partition_key
    assert record.partition == partition_for(record.key, 16)
    keyed = encode("t", Keyed(key="k1"), 16, 1 << 20)
    assert keyed.key == "k1" and keyed.partition == partition_for("k1", 16)


async def test_a_batch_with_headers_gives_every_message_its_own_copy() -> None:
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=4) as broker:
        got: list[MessageContext[Keyed]] = []

        async def handle(ctx: MessageContext[Keyed]) -> None:
            got.append(ctx)

        headers = {"tenant": "acme"}
        await broker.subscribe("t", "g", handle)
        await broker.publish_batch("t", [Keyed(key=f"k{i}") for i in range(5)], headers=headers)
        await eventually(lambda: len(got) == 5)
        assert all(ctx.headers == {"tenant": "acme"} for ctx in got)
        assert len({id(ctx.headers) for ctx in got}) == 5
        headers["tenant"] = "changed"
        assert all(ctx.headers == {"tenant": "acme"} for ctx in got)


class _Listener:
    async def assigned(self, partitions: Sequence[int]) -> None:
        pass

    async def revoked(self, partitions: Sequence[int]) -> None:
        pass


async def test_a_memory_member_whose_lease_changed_hands_settles_nothing() -> None:
    async with msgbroker.connect(f"memory://{uuid.uuid4().hex}", partition_count=1) as broker:
        transport = broker.transport
        lane = Lane("t", "g", 0)
        consumer = transport.consumer("t", "g", "member-a")
        await consumer.start(_Listener(), None)
        token = await transport.acquire_lease(lane, "member-a", 30.0)
        assert token is not None
        await consumer.open_lane(0, token)
        await broker.publish_batch("t", [Keyed(key=f"k{i}") for i in range(3)])
        deliveries = await consumer.poll([0], 10, 0.5, asyncio.Event())
        assert len(deliveries) == 3

        await consumer.ack(deliveries[0])  # holds the lease: settles
        assert await transport.pending_count("t", "g") == 2

        await transport.release_lease(lane, token)  # the lane moves to another member
        assert await transport.acquire_lease(lane, "member-b", 30.0) is not None
        await consumer.ack(deliveries[1])  # fenced: dropped
        await consumer.dead_letter(deliveries[2], await _letter(deliveries[2]))  # fenced too
        assert await transport.pending_count("t", "g") == 2
        assert await transport.dead_letters("t", "g") == []
        assert await consumer.poll([0], 10, 0.0, asyncio.Event()) == []  # and reads nothing


async def _letter(delivery: msgbroker.Delivery) -> msgbroker.DeadLetter:
    return msgbroker.DeadLetter(message_id=delivery.message_id, topic="t", group="g", partition=0, error="x",
                                attempts=1, headers={}, payload=delivery.body)


def test_names_are_still_checked_once_valid_ones_are_remembered() -> None:
    for i in range(5000):  # past the memory's bound: it starts over
        assert validate_name("topic", f"t-{i}") == f"t-{i}"
    assert validate_name("group", "t-4999") == "t-4999"
    for bad in ["", ".t", "-t", "a..b", "t.", "a b", "x" * 201, None, 7]:
        with pytest.raises(InvalidNameError):
            validate_name("topic", bad)

    class Sneaky(str):
        pass

    assert validate_name("topic", Sneaky("t-1")) == "t-1"


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_the_parents_pending_message_ids() -> None:
    import os

    _uuid4()  # the pool now holds ids made in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the ids it makes, exit without running the parent's cleanup
        os.close(read)
        os.write(write, "".join(str(_uuid4()) for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 4096):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    mine = "".join(str(_uuid4()) for _ in range(20))
    child_ids = {child[i:i + 36].decode() for i in range(0, len(child), 36)}
    assert len(child_ids) == 20
    assert not child_ids & {mine[i:i + 36] for i in range(0, len(mine), 36)}


def test_the_record_id_is_str_of_the_message_id_however_the_body_writes_it() -> None:
    from pydantic import ConfigDict, field_serializer
    from pydantic.alias_generators import to_camel

    class Custom(Message):
        @field_serializer("message_id")
        def _id(self, value: uuid.UUID) -> str:
            return "X" * 36

    class Camel(Message):
        model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)

    assigned = Plain()
    assigned.message_id = "0" * 36  # type: ignore[assignment]  # no validation on assignment
    for message in (Plain(), Keyed(key="k"), Custom(), Camel()):
        record = encode("t", message, 16, 1 << 20)
        assert record.message_id == str(message.message_id)
    with pytest.warns(UserWarning, match="serializ"):  # pydantic's: a str where a UUID belongs
        assert encode("t", assigned, 16, 1 << 20).message_id == "0" * 36
    assert encode("t", Custom(), 16, 1 << 20).body.startswith(b'{"message_id":"' + b"X" * 36)
