"""Declaring a topic's and a group's exchanges and queues (idempotent; safe to repeat)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import exceptions as amqp
from msgbroker.spi import ConfigurationError

from ._errors import translate
from ._link import Link
from ._names import Topology

__all__ = ["backlog_exists", "declare_backlog", "declare_group", "declare_replicated", "declare_topic"]

log = logging.getLogger("msgbroker.rabbitmq")


async def declare_replicated(
    link: Link,
    channel: AbstractChannel,
    raw: aiormq.abc.AbstractChannel,
    queue: str,
    arguments: dict[str, Any],
    legacy: dict[str, Any],
) -> tuple[AbstractChannel, aiormq.abc.AbstractChannel]:
    """Declare ``queue`` (durable) with ``arguments``, a quorum queue. Where an earlier version of
    the provider declared it as a classic queue, that one is kept: declared again with its old
    ``legacy`` arguments on a fresh channel (the refusal closed this one), which is returned."""
    try:
        await raw.queue_declare(queue, durable=True, arguments=arguments)
        return channel, raw
    except amqp.ChannelPreconditionFailed as exc:
        if "'x-queue-type'" not in str(exc):
            raise
    log.info("rabbitmq: %s exists as a classic queue (declared by an earlier version); it is kept, on one node "
             "only: delete it to have it declared as a replicated quorum queue", queue)
    with contextlib.suppress(Exception):
        await channel.close()
    channel, raw = await link.channel()
    await raw.queue_declare(queue, durable=True, arguments=legacy)
    return channel, raw


async def declare_topic(link: Link, topology: Topology, topic: str, partitions: int) -> None:
    """The topic's exchange and its alternate (backlog) exchange, and the marker queue that pins
    the partition count (a wrong count raises ConfigurationError). Backlog queues are declared
    only when a message needs one (:func:`declare_backlog`): most topics never do."""
    channel, raw = await link.channel()
    try:
        try:
            channel, raw = await declare_replicated(
                link, channel, raw, topology.meta_queue(topic), topology.meta_arguments(partitions),
                topology.legacy_meta_arguments(partitions),
            )
        except amqp.ChannelPreconditionFailed as exc:
            if "'x-max-length'" not in str(exc):
                raise
            raise ConfigurationError(
                f"topic {topic!r} exists on the RabbitMQ server with another partition count; this connection "
                f"has partition_count={partitions} ({exc.args[0] if exc.args else exc})"
            ) from exc
        backlog = topology.backlog_exchange(topic)
        await raw.exchange_declare(backlog, exchange_type="direct", durable=True)
        await raw.exchange_declare(
            topology.exchange(topic), exchange_type="direct", durable=True, arguments={"alternate-exchange": backlog}
        )
    except asyncio.CancelledError:
        raise
    except ConfigurationError:
        raise
    except Exception as exc:
        raise translate(exc, f"declaring topic {topic!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def declare_backlog(link: Link, topology: Topology, topic: str, partitions: set[int]) -> None:
    """The backlog queues of these partitions, bound to the topic's alternate exchange."""
    channel, raw = await link.channel()
    try:
        backlog = topology.backlog_exchange(topic)
        for partition in sorted(partitions):
            queue = topology.backlog_queue(topic, partition)
            await raw.queue_declare(queue, durable=True, arguments=topology.backlog_arguments())
            await raw.queue_bind(queue, backlog, routing_key=str(partition))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise translate(exc, f"declaring the backlog of topic {topic!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def backlog_exists(link: Link, topology: Topology, topic: str, partition: int) -> bool:
    """Whether the partition's backlog queue exists (checked on a channel of its own, since a
    passive declaration of a missing queue closes the channel)."""
    channel, raw = await link.channel()
    try:
        await raw.queue_declare(topology.backlog_queue(topic, partition), passive=True)
        return True
    except amqp.ChannelNotFoundEntity:
        return False
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise translate(exc, f"looking for the backlog of {topic!r}[{partition}]") from exc
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def declare_group(link: Link, topology: Topology, topic: str, group: str, partitions: int) -> None:
    """The group's lane queues (bound to the topic exchange: from now on the group gets every
    message of the topic), its letters queue, and the exchanges its members publish letters,
    retry notes and census answers to."""
    channel, raw = await link.channel()
    try:
        dlx = topology.dead_letter_exchange()
        letters = topology.letters_queue(topic, group)
        await raw.exchange_declare(dlx, exchange_type="direct", durable=True)
        await raw.exchange_declare(topology.direct_exchange(), exchange_type="direct", durable=True)
        try:
            await raw.queue_declare(letters, durable=True, arguments=topology.letters_arguments())
        except amqp.ChannelNotFoundEntity as exc:
            if "home node" not in str(exc):
                raise
            # A classic queue lives on one node: while that node is down the group goes on (its
            # dead-lettering waits for the node); the queue exists, so binding it again is not needed.
            log.warning("rabbitmq: the letters queue %s is on a node that is down; dead letters of %r wait for it",
                        letters, group)
            with contextlib.suppress(Exception):
                await channel.close()
            channel, raw = await link.channel()
        else:
            await raw.queue_bind(letters, dlx, routing_key=letters)
        exchange = topology.exchange(topic)
        arguments = topology.lane_arguments(topic, group)
        for partition in range(partitions):
            queue = topology.lane_queue(topic, group, partition)
            await raw.queue_declare(queue, durable=True, arguments=arguments)
            await raw.queue_bind(queue, exchange, routing_key=str(partition))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise translate(exc, f"declaring group {group!r} on topic {topic!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
