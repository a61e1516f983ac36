"""Publishing with confirms and mandatory routing, in order, the backlog declared on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq import exceptions as amqp
from aiormq.abc import DeliveredMessage
from msgbroker.resilience import JitteredBackoff
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
from ._errors import cancelled, translate
from ._link import Link
from ._names import Topology

__all__ = ["KEY_HEADER", "PERSISTENT", "PUBLISH_TIMEOUT", "publish_confirmed"]

log = logging.getLogger("msgbroker.rabbitmq")

PERSISTENT = 2
PUBLISH_TIMEOUT = 30.0
"""How long a publish waits for the server's confirms before it is indeterminate."""
CONFIRM_PATIENCE = 10.0
"""How long a publish waits for a confirm before sending the message again on a new channel.
Confirms come within milliseconds; on a cluster, a publish to a quorum queue whose leader has
just gone can go unanswered (seen for 30 s after a node restart), or be refused
(``basic.nack``), and the channel that got such a nack goes on nacking every later publish even
once a new leader is elected (RabbitMQ 3.10), while a new channel publishes at once. So what is
not confirmed goes out again on a new channel, until :data:`PUBLISH_TIMEOUT`."""
FAILOVER_PATIENCE = 2.0
"""The same while a failover is likely under way: once this publish was refused or went
unconfirmed, and for :data:`FAILOVER_WINDOW` after the connection was re-established. In the
cluster's rolling-restart test, publishing stalled for 10.8 s (one :data:`CONFIRM_PATIENCE`)
without it and at most 0.8 s with it. A healthy cluster confirms within milliseconds; a
resend that was not needed only stores duplicates (never loses or reorders)."""
FAILOVER_WINDOW = 30.0
"""How long after a reconnect :data:`FAILOVER_PATIENCE` applies."""
REFUSED_BACKOFF = JitteredBackoff(0.05, 1.0)
"""The pause before each such retry (the resilience module's backoff)."""


MAX_HEADER_NAME_BYTES = 128
"""AMQP 0-9-1 limits a field-table name to 128 bytes (pamqp truncates longer ones, silently to the receiver)."""


_DEATH_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")
_CHANNEL_GONE = (amqp.ChannelClosed, amqp.ChannelInvalidStateError, asyncio.CancelledError)
"""What a publish raises when another caller closed the shared channel under it (a cancellation
of the caller's own task is raised before these are looked at)."""


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
    if len(records) == 1:
        rounds[0].append(records[0])
    else:
        ids: set[str] = set()
        for record in records:
            if record.message_id in ids:
                rounds.append([])
                ids.clear()
            ids.add(record.message_id)
            rounds[-1].append(record)
    channels = _Channels(link, channel)
    try:
        for chunk in rounds:
            returned = await _publish_stored(channels, topology, chunk)
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
            again = await _publish_stored(channels, topology, returned)
            if again:
                raise PublishFailedError(
                    f"rabbitmq: {len(again)} message(s) to {again[0].topic!r} were returned unroutable twice "
                    f"(first {again[0].message_id}): is the topic's backlog exchange missing?"
                )
    finally:
        await channels.close()


class _Channels:
    """The caller's confirm channel, replaced after a refusal by new ones of our own (closed
    when the publish is done). The caller's channel is closed then: it would go on nacking, and
    its owner opens a new one when it finds it closed."""

    def __init__(self, link: Link, channel: aiormq.abc.AbstractChannel) -> None:
        self.link = link
        self.current = channel
        self.own: list[AbstractChannel] = []

    def patience(self) -> float:
        """How long to wait for confirms on the current channel (see :data:`FAILOVER_PATIENCE`)."""
        reconnected = self.link.reconnected_at
        if self.own or (reconnected is not None and time.monotonic() - reconnected < FAILOVER_WINDOW):
            return FAILOVER_PATIENCE
        return CONFIRM_PATIENCE

    async def renew(self) -> None:
        try:
            await self.current.close()  # concurrent callers may be closing it too
        except asyncio.CancelledError:
            if cancelled():
                raise
        except Exception:  # closed already, or the connection went: opening the new channel says which
            pass
        channel, self.current = await self.link.channel(confirms=True)
        self.own.append(channel)

    async def close(self) -> None:
        for channel in self.own:
            with contextlib.suppress(Exception):
                await channel.close()


async def _publish_stored(
    channels: _Channels, topology: Topology, records: list[OutgoingRecord]
) -> list[OutgoingRecord]:
    """:func:`_publish_round` until the server confirmed every record (or returned it
    unroutable): what it refused, or did not confirm in time (:meth:`_Channels.patience`), goes out
    again on a new channel, with every record after it of the same partition (so that the
    partition's order holds; those already stored become duplicates). Returns the records
    returned unroutable. Past :data:`PUBLISH_TIMEOUT`: PublishIndeterminateError when a confirm
    is missing, else PublishFailedError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PUBLISH_TIMEOUT
    returned: dict[int, OutgoingRecord] = {}
    pending = list(enumerate(records))
    retry = 0
    while True:
        patience = max(0.1, min(channels.patience(), deadline - loop.time()))
        came_back, refused, unconfirmed = await _publish_round(
            topology, channels.current, [r for _, r in pending], patience, channels.link
        )
        returned.update((pending[i][0], pending[i][1]) for i in came_back)
        again = sorted(refused + unconfirmed)
        if not again:
            return [returned[i] for i in sorted(returned)]
        first: dict[tuple[str, int], int] = {}
        for i in again:
            record = pending[i][1]
            first.setdefault((record.topic, record.partition), i)
        sample = pending[again[0]][1]
        pending = [(n, r) for i, (n, r) in enumerate(pending) if i >= first.get((r.topic, r.partition), len(pending))]
        for n, _ in pending:
            returned.pop(n, None)
        retry += 1
        pause = REFUSED_BACKOFF.delay(retry)
        if loop.time() + pause >= deadline:
            if unconfirmed:
                raise PublishIndeterminateError(
                    f"rabbitmq: {len(unconfirmed)} publish(es) to {sample.topic!r} (first {sample.message_id}) were "
                    f"not confirmed within {PUBLISH_TIMEOUT:.0f}s: they may or may not have been stored"
                )
            raise PublishFailedError(
                f"rabbitmq: the server refused {len(refused)} message(s) to {sample.topic!r} (first "
                f"{sample.message_id}; basic.nack) for {PUBLISH_TIMEOUT:.0f}s: does the partition's queue "
                "have a leader (a majority of its nodes up)?"
            )
        log.info("rabbitmq: %d publish(es) to %r refused (basic.nack) and %d not confirmed in %.0fs (first %s); "
                 "sending them and the %d after them again on a new channel", len(refused), sample.topic,
                 len(unconfirmed), patience, sample.message_id, len(pending) - len(again))
        await asyncio.sleep(pause)
        try:
            await channels.renew()
        except MsgBrokerError as exc:
            if not unconfirmed:
                raise
            raise PublishIndeterminateError(
                f"rabbitmq: {len(unconfirmed)} publish(es) to {sample.topic!r} (first {sample.message_id}) may or may "
                f"not have been stored: {exc}"
            ) from exc


async def _publish_round(
    topology: Topology, channel: aiormq.abc.AbstractChannel, records: list[OutgoingRecord], patience: float,
    link: Link,
) -> tuple[list[int], list[int], list[int]]:
    """One burst in order (aiormq sends frames under a FIFO lock); the confirms come back
    together. Returns the positions of the records the server returned unroutable, of those it
    refused (``basic.nack``) and of those not confirmed within ``patience`` seconds — or whose
    channel was closed under them while the connection stayed up: concurrent callers share the
    connection's confirm channel, and one whose message was refused closes it (see
    :class:`_Channels`); the others' publishes are not refused for that, they go out again."""
    def publish(record: OutgoingRecord) -> Awaitable[Any]:
        return publish_unlocked(  # do not hold aiormq's channel lock until each frame is on the socket
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
            timeout=patience,
        )

    results: list[Any]
    if len(records) == 1:  # one publish() awaits its confirm in the caller's task (gather would add a task)
        result: Any
        try:
            result = await publish(records[0])
        except asyncio.CancelledError as exc:
            result = exc
        except Exception as exc:
            result = exc
        if not isinstance(result, (BaseException, DeliveredMessage)):
            return [], [], []  # confirmed (basic.ack): what the sorting below finds, without it
        results = [result]
    else:
        results = await asyncio.gather(*(publish(record) for record in records), return_exceptions=True)
    pairs = list(zip(records, results, strict=True))
    for _, result in pairs:
        if isinstance(result, asyncio.CancelledError) and cancelled():
            raise result
    for record, result in pairs:
        if isinstance(result, amqp.ChannelAccessRefused):  # no write permission: nothing was stored
            raise translate(result, f"publishing to {record.topic!r}") from result
    if link.is_up:  # a channel closed under the publish (not the connection): send it again
        results = [TimeoutError("its channel was closed") if isinstance(x, _CHANNEL_GONE) else x for x in results]
        pairs = list(zip(records, results, strict=True))
    # A publish cancelled by aiormq itself (a connection found stuck, its reader cancelled) is
    # indeterminate like any other lost connection.
    unknown = [(r, x) for r, x in pairs
               if isinstance(x, BaseException) and not isinstance(x, (amqp.DeliveryError, TimeoutError))]
    if unknown:
        record, first = unknown[0]
        raise PublishIndeterminateError(
            f"rabbitmq: {len(unknown)} of {len(records)} publish(es) to {record.topic!r} may or may not have been "
            f"stored: {translate(first, 'publishing')}"
        ) from first
    refused = [i for i, x in enumerate(results) if isinstance(x, amqp.DeliveryError)]
    unconfirmed = [i for i, x in enumerate(results) if isinstance(x, TimeoutError)]
    return [i for i, x in enumerate(results) if isinstance(x, DeliveredMessage)], refused, unconfirmed
