"""Request/reply on RabbitMQ (docs/semantics.md, rule 13): a requesting connection's reply inbox
is an exclusive auto-delete queue ``<prefix>:@replies:<uuid>`` bound, under its own name, to the
direct exchange ``<prefix>:@replies``; a reply is one publish there, the request id in
``correlation_id`` and the reply's headers in the AMQP headers. Both names start with the
exchange prefix, so a tenant's permissions (docs/security.md) cover them. The inbox is declared
again, under the same name, after a reconnect (a reply sent while the connection was down is
lost: the request times out)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from aiormq.abc import DeliveredMessage
from msgbroker.spi import ReplySink
from pamqp import commands as spec

from ._link import Link
from ._names import Topology

__all__ = ["ReplyInbox", "replies_exchange"]

log = logging.getLogger("msgbroker.rabbitmq")


def replies_exchange(topology: Topology) -> str:
    """The direct exchange every reply of this exchange prefix goes through."""
    return f"{topology.prefix}:@replies"


async def declare_replies_exchange(link: Link, topology: Topology) -> None:
    channel, raw = await link.channel()
    try:
        await raw.exchange_declare(replies_exchange(topology), exchange_type="direct", durable=True)
    finally:
        await channel.close()


class ReplyInbox:
    """One connection's reply queue and its consumer."""

    def __init__(self, topology: Topology, deliver: ReplySink) -> None:
        self._topology = topology
        self._deliver = deliver
        self.queue = f"{topology.prefix}:@replies:{uuid.uuid4().hex}"

    async def declare(self, link: Link) -> None:
        """Declare, bind and consume the queue on ``link`` (at open and after every reconnect)."""
        _, raw = await link.channel()
        exchange = replies_exchange(self._topology)
        await raw.exchange_declare(exchange, exchange_type="direct", durable=True)
        await raw.queue_declare(self.queue, exclusive=True, auto_delete=True)
        await raw.queue_bind(self.queue, exchange, routing_key=self.queue)
        await raw.basic_consume(self.queue, self._on_reply, no_ack=True)

    async def _on_reply(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        request_id = properties.correlation_id
        if not request_id:
            return
        raw_headers: dict[str, Any] = dict(properties.headers or {})
        headers = {str(k): v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                   for k, v in raw_headers.items()}
        self._deliver(request_id, headers, message.body)


def reply_properties(request_id: str, headers: Mapping[str, str]) -> spec.Basic.Properties:
    return spec.Basic.Properties(correlation_id=request_id, headers=dict(headers), content_type="application/json")
