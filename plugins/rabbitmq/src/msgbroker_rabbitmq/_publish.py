"""Publishing with confirms and mandatory routing, in order, the backlog declared on demand."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiormq
from aiormq import exceptions as amqp
from aiormq.abc import DeliveredMessage
from msgbroker.spi import (
    CONTENT_TYPE,
    KEY_HEADER,
    InvalidNameError,
    MsgBrokerError,
    OutgoingRecord,
    PublishFailedError,
    PublishIndeterminateError,
)
from pamqp import commands as spec

from ._compat import publish_unlocked
from ._declare import declare_backlog
from ._errors import translate
from ._link import Link
from ._names import Topology

__all__ = ["KEY_HEADER", "PERSISTENT", "PUBLISH_TIMEOUT", "publish_confirmed"]

PERSISTENT = 2
PUBLISH_TIMEOUT = 30.0
"""How long a publish waits for the server's confirm before it is indeterminate."""


MAX_HEADER_NAME_BYTES = 128
"""AMQP 0-9-1 limits a field-table name to 128 bytes (pamqp truncates longer ones, silently to the receiver)."""


_DEATH_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")


def _check_headers(record: OutgoingRecord) -> None:
    """Refuse, naming it, a header AMQP cannot carry faithfully (found by the fuzzed-headers fault
    test: a name past 128 bytes vanished in transit) or one that names the broker's own."""
    for name in record.headers:
        if len(name.encode("utf-8")) > MAX_HEADER_NAME_BYTES:
            raise InvalidNameError(
                f"rabbitmq: header name {name[:40]!r}... of message {record.message_id} is "
                f"{len(name.encode('utf-8'))} bytes of UTF-8; AMQP allows at most {MAX_HEADER_NAME_BYTES}"
            )
        if name == KEY_HEADER or name == "x-delivery-count" or name.startswith(_DEATH_PREFIXES):
            raise InvalidNameError(
                f"rabbitmq: header name {name!r} of message {record.message_id} is reserved: msgbroker or "
                "RabbitMQ sets it, so it would not arrive as sent"
            )


async def publish_confirmed(
    link: Link, topology: Topology, channel: aiormq.abc.AbstractChannel, records: Sequence[OutgoingRecord]
) -> None:
    """Publish ``records`` (to their topics' exchanges, routing key = partition) and return once
    the server confirmed each. A message no queue took — no group is bound and its partition has
    no backlog queue yet — comes back (``mandatory``): its backlog queue is declared and it is
    published again. Anything else the server did not store raises; nothing vanishes silently."""
    for record in records:
        _check_headers(record)
    # aiormq matches a returned message to its publish by message id: one id per round.
    rounds: list[list[OutgoingRecord]] = [[]]
    ids: set[str] = set()
    for record in records:
        if record.message_id in ids:
            rounds.append([])
            ids.clear()
        ids.add(record.message_id)
        rounds[-1].append(record)
    for chunk in rounds:
        returned = await _publish_round(topology, channel, chunk)
        if not returned:
            continue
        try:
            for topic in dict.fromkeys(r.topic for r in returned):
                await declare_backlog(link, topology, topic, {r.partition for r in returned if r.topic == topic})
        except MsgBrokerError as exc:
            raise PublishFailedError(
                f"rabbitmq: {len(returned)} message(s) to {returned[0].topic!r} were returned unroutable (first "
                f"{returned[0].message_id}) and no backlog queue could be declared for them: {exc}"
            ) from exc
        again = await _publish_round(topology, channel, returned)
        if again:
            raise PublishFailedError(
                f"rabbitmq: {len(again)} message(s) to {again[0].topic!r} were returned unroutable twice "
                f"(first {again[0].message_id}): is the topic's backlog exchange missing?"
            )


async def _publish_round(
    topology: Topology, channel: aiormq.abc.AbstractChannel, records: list[OutgoingRecord]
) -> list[OutgoingRecord]:
    """One burst in order (aiormq sends frames under a FIFO lock); the confirms come back
    together. Returns the records the server returned unroutable."""
    results = await asyncio.gather(
        *(
            publish_unlocked(  # do not hold aiormq's channel lock until each frame is on the socket
                channel,
                record.body,
                exchange=topology.exchange(record.topic),
                routing_key=str(record.partition),
                properties=spec.Basic.Properties(
                    delivery_mode=PERSISTENT,
                    message_id=record.message_id,
                    content_type=CONTENT_TYPE,
                    headers={**record.headers, KEY_HEADER: record.key},
                ),
                mandatory=True,
                timeout=PUBLISH_TIMEOUT,
            )
            for record in records
        ),
        return_exceptions=True,
    )
    pairs = list(zip(records, results, strict=True))
    for _, result in pairs:
        if isinstance(result, asyncio.CancelledError):
            raise result
    unknown = [(r, x) for r, x in pairs if isinstance(x, BaseException) and not isinstance(x, amqp.DeliveryError)]
    if unknown:
        record, first = unknown[0]
        raise PublishIndeterminateError(
            f"rabbitmq: {len(unknown)} of {len(records)} publish(es) to {record.topic!r} may or may not have been "
            f"stored: {translate(first, 'publishing')}"
        ) from first
    refused = [r for r, x in pairs if isinstance(x, amqp.DeliveryError)]
    if refused:
        raise PublishFailedError(
            f"rabbitmq: the server refused {len(refused)} message(s) to {refused[0].topic!r} "
            f"(first {refused[0].message_id}; basic.nack)"
        )
    return [r for r, x in pairs if isinstance(x, DeliveredMessage)]
