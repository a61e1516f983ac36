"""Several node addresses, replicated queues and refused publishes, against the real server
(one node here; the 3-node cluster under node failure is tests/cluster/test_cluster_rabbitmq.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from typing import Any

import aio_pika
import msgbroker
import pytest
from aiormq import exceptions as amqp
from msgbroker import Message, MessageContext
from msgbroker_rabbitmq import Topology


class Keyed(Message):
    key: str

    @property
    def partition_key(self) -> str:
        return self.key


def _settings(prefix: str, **rabbitmq: Any) -> dict[str, Any]:
    return {"partition_count": 4, "retry_delay": 0,
            "rabbitmq": {"exchange_prefix": prefix, "claim_timeout": 2, "queue_expires": 300, **rabbitmq}}


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_node_that_does_not_answer_is_passed_over_for_the_next(amqp_url: str, prefix: str) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    topic = f"nodes-{uuid.uuid4().hex[:6]}"
    handled: list[str] = []

    async def handle(ctx: MessageContext[Keyed]) -> None:
        handled.append(ctx.message.key)

    async with msgbroker.connect(f"{dead}, {amqp_url}", **_settings(prefix)) as broker:
        await broker.subscribe(topic, "g", handle)  # the member's own connection goes the same way
        await broker.publish(topic, Keyed(key="k"))
        for _ in range(200):
            if handled:
                break
            await asyncio.sleep(0.05)
        assert handled == ["k"]
        assert await broker.is_healthy()


async def test_no_node_answering_names_every_node(prefix: str) -> None:
    dead = [f"amqp://guest:secret@127.0.0.1:{_closed_port()}/" for _ in range(2)]
    broker = msgbroker.connect(",".join(dead), **_settings(prefix))
    with pytest.raises(msgbroker.BrokerConnectionError) as caught:
        await broker.open()
    text = str(caught.value)
    assert "none of the 2 nodes answered" in text and all(u.replace("secret", "***") in text for u in dead)
    assert "secret" not in text


@pytest.mark.parametrize("url", [
    "amqp://guest:guest@127.0.0.1:5672/,http://127.0.0.1:80/",
    "amqp://guest:guest@127.0.0.1:5672/,amqps://guest:guest@127.0.0.1:5671/",
    "amqp://guest:guest@127.0.0.1:notaport/",
    " , ",
])
async def test_a_bad_node_address_is_refused_at_connect(url: str, prefix: str) -> None:
    settings = _settings(prefix, url=url)
    with pytest.raises(msgbroker.ConfigurationError, match=r"rabbitmq\.url"):
        msgbroker.connect(None, provider="rabbitmq", **settings)


async def test_every_durable_queue_but_the_letters_is_a_quorum_queue_of_the_set_group_size(
    amqp_url: str, prefix: str
) -> None:
    topic = f"nodes-{uuid.uuid4().hex[:6]}"

    async def handle(ctx: MessageContext[Keyed]) -> None:
        await ctx.nak(requeue=True)  # a retry: the lane's note queue is declared

    async with msgbroker.connect(amqp_url, **_settings(prefix, quorum_initial_group_size=1)) as broker:
        await broker.subscribe(topic, "g", handle)
        await broker.publish(topic, Keyed(key="k"))
        topology: Topology = broker.transport.topology  # type: ignore[attr-defined]
        partition = msgbroker.partition_for("k", 4)
        queues = {topology.meta_queue(topic): topology.meta_arguments(4),
                  topology.lane_queue(topic, "g", partition): topology.lane_arguments(topic, "g"),
                  topology.note_queue(topic, "g", partition): topology.note_arguments()}
        assert all(a["x-queue-type"] == "quorum" and a["x-quorum-initial-group-size"] == 1 for a in queues.values())
        connection = await aio_pika.connect(amqp_url)
        try:
            for _ in range(100):  # the note queue comes with the first retry
                channel = await connection.channel()
                try:
                    await channel.declare_queue(list(queues)[-1], passive=True)
                    break
                except aio_pika.exceptions.ChannelClosed:
                    await asyncio.sleep(0.05)
            for queue, declared in queues.items():
                # the server has them so: redeclared as a classic queue, or with another group size,
                # each is refused naming the argument
                for change, named in (({"x-queue-type": "classic"}, "x-queue-type"),
                                      ({"x-quorum-initial-group-size": 2}, "x-quorum-initial-group-size")):
                    arguments = {**declared, **change}
                    channel = await connection.channel()
                    underlay = await channel.get_underlay_channel()
                    with pytest.raises(amqp.ChannelPreconditionFailed, match=named):
                        await underlay.queue_declare(queue, durable=True, arguments=arguments)
        finally:
            await connection.close()


async def test_a_marker_declared_classic_by_an_earlier_version_is_kept(amqp_url: str, prefix: str) -> None:
    topic = f"nodes-{uuid.uuid4().hex[:6]}"
    topology = Topology(prefix, 300_000)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        await underlay.queue_declare(topology.meta_queue(topic), durable=True,
                                     arguments=topology.legacy_meta_arguments(4))
    finally:
        await connection.close()
    async with msgbroker.connect(amqp_url, **_settings(prefix)) as broker:
        await broker.publish(topic, Keyed(key="k"))  # the classic marker still pins the count
    with pytest.raises(msgbroker.ConfigurationError, match="partition count"):
        async with msgbroker.connect(amqp_url, **{**_settings(prefix), "partition_count": 8}) as broker:
            await broker.publish(topic, Keyed(key="k"))


async def test_a_refused_publish_goes_out_again_on_a_new_channel_until_stored(
    amqp_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A nack (here: a queue that rejects every publish, bound beside the lane) is sent again
    rather than failing at once: on a cluster it means the queue's leader has just died."""
    caplog.set_level(logging.INFO, logger="msgbroker.rabbitmq")
    topic = f"nodes-{uuid.uuid4().hex[:6]}"
    handled: list[str] = []

    async def handle(ctx: MessageContext[Keyed]) -> None:
        handled.append(ctx.message.key)

    async with msgbroker.connect(amqp_url, **_settings(prefix)) as broker:
        await broker.subscribe(topic, "g", handle)
        topology: Topology = broker.transport.topology  # type: ignore[attr-defined]
        partition = msgbroker.partition_for("k", 4)
        rejecting = f"{prefix}:rejecting"
        connection = await aio_pika.connect(amqp_url)
        try:
            underlay = await (await connection.channel()).get_underlay_channel()
            await underlay.queue_declare(rejecting, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
            await underlay.queue_bind(rejecting, topology.exchange(topic), routing_key=str(partition))
            publishing = asyncio.create_task(broker.publish(topic, Keyed(key="k")))
            for _ in range(200):
                if "refused (basic.nack)" in caplog.text:
                    break
                await asyncio.sleep(0.02)
            assert "refused (basic.nack)" in caplog.text and not publishing.done()
            await underlay.queue_delete(rejecting)
            await asyncio.wait_for(publishing, 10)
        finally:
            await connection.close()
        for _ in range(200):
            if handled:
                break
            await asyncio.sleep(0.05)
        assert handled and set(handled) == {"k"}  # the lane got it (perhaps twice: at least once)


async def test_channel_numbers_wrapping_past_channels_the_server_just_closed_keep_the_connection(
    amqp_url: str,
) -> None:
    """A member with 1,024 lanes holds a channel per lane and opens a short one per lane whose
    passive declare the server refuses (closing that channel); the numbers wrap at the server's
    ``channel_max`` within a second. A number freed by the server's ``channel.close`` but not yet
    answered by its ``close-ok`` must not be opened again: the server closes the whole connection
    for that ("second 'channel.open' seen"), and a member's prefetched messages were dead-lettered
    for their delivery count after enough of those."""
    from msgbroker_rabbitmq._link import Link

    downs: list[int] = []
    link = Link([amqp_url], "rmqtest-channel-numbers", heartbeat=30, on_down=lambda: downs.append(1))
    await link.open()
    try:
        generation = link.generation
        held = [await link.channel() for _ in range(1024)]  # the lanes' own channels
        missing = f"rmqtest-missing-{uuid.uuid4().hex[:8]}"
        refused = 0
        gate = asyncio.Semaphore(128)  # as many short channels at once as a member opens

        async def look() -> None:
            nonlocal refused
            async with gate:
                channel, raw = await link.channel()
                try:
                    await raw.queue_declare(missing, passive=True)
                except amqp.ChannelNotFoundEntity:
                    refused += 1
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()

        await asyncio.gather(*(look() for _ in range(3000)))  # past the wrap at 2,047 more than once
        assert (refused, downs, link.generation) == (3000, [], generation)
        for channel, _ in held:
            assert not channel.is_closed
    finally:
        await link.close()
