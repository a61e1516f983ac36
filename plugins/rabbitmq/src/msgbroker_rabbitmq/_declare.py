"""Declaring a topic's and a group's exchanges and queues (idempotent; safe to repeat)."""

from __future__ import annotations

import asyncio
import contextlib

from aiormq import exceptions as amqp
from msgbroker import ConfigurationError

from ._errors import translate
from ._link import Link
from ._names import Topology

__all__ = ["declare_group", "declare_topic"]


async def declare_topic(link: Link, topology: Topology, topic: str, partitions: int) -> None:
    """The topic's exchange, its alternate (backlog) exchange with one queue per partition, and
    the marker queue that pins the partition count. A wrong count raises ConfigurationError."""
    channel, raw = await link.channel()
    try:
        try:
            await raw.queue_declare(topology.meta_queue(topic), durable=True, arguments={"x-max-length": partitions})
        except amqp.ChannelPreconditionFailed as exc:
            raise ConfigurationError(
                f"topic {topic!r} exists on the RabbitMQ server with another partition count; this connection "
                f"has partition_count={partitions} ({exc.args[0] if exc.args else exc})"
            ) from exc
        backlog = topology.backlog_exchange(topic)
        await raw.exchange_declare(backlog, exchange_type="direct", durable=True)
        for partition in range(partitions):
            queue = topology.backlog_queue(topic, partition)
            await raw.queue_declare(queue, durable=True, arguments=topology.backlog_arguments())
            await raw.queue_bind(queue, backlog, routing_key=str(partition))
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


async def declare_group(link: Link, topology: Topology, topic: str, group: str, partitions: int) -> None:
    """The group's lane queues (bound to the topic exchange: from now on the group gets every
    message of the topic) and its letters queue."""
    channel, raw = await link.channel()
    try:
        dlx = topology.dead_letter_exchange()
        letters = topology.letters_queue(topic, group)
        await raw.exchange_declare(dlx, exchange_type="direct", durable=True)
        await raw.queue_declare(letters, durable=True, arguments={"x-queue-type": "classic"})
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
