"""JetStream publish acks, read by the provider itself.

A JetStream publish is a NATS publish with a reply subject: the stream answers there with its
ack (``{"stream": ..., "seq": ...}``), an error (``{"error": ...}``) or, when no stream takes the
subject, a ``503`` status. nats-py's ``publish_async`` makes a future per message, takes a slot
of a semaphore, draws random bytes for its token and builds a ``PubAck`` from every answer; for a
batch of 500 that cost twice the client CPU of the publishes themselves (30-38 µs a message
against 15-20 µs measured side by side). Here one wildcard subscription of the connection takes
every answer; a batch waits on one future, and an ack is only looked at for an error.

It also sees a stream's refusal: nats-py's ``APIError.from_error`` raises the error it builds, so
its ``publish_async`` never completed the future of a refused message (a stream full with
``discard: new`` made the publish wait its whole deadline, then "may or may not be stored").
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import nats.js.errors

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["Acks", "Waiter"]

_NO_RESPONDERS = "503"


class Waiter:
    """The acks one publish (of one or many messages) waits for: ``future`` is done once every
    message was answered; ``errors`` maps a message's index to what its answer said went wrong
    (:class:`nats.js.errors.NoStreamResponseError`: no stream took it; an ``APIError``: the
    stream refused it)."""

    __slots__ = ("errors", "future", "left", "tokens")

    def __init__(self, count: int) -> None:
        self.left = count
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.errors: dict[int, Exception] = {}
        self.tokens: list[str] = []


class Acks:
    """The ack subscription of one connection: a publish's reply subject is ``<inbox>.<n>``."""

    def __init__(self) -> None:
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._subscribing = asyncio.Lock()
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, tuple[Waiter, int]] = {}

    async def ready(self, nc: Client) -> None:
        """Subscribe on ``nc`` (once per connection object; nats-py subscribes again after a
        reconnect by itself). Publishes that start together wait for the one subscription: a
        second one, made meanwhile, took the first's place and its publishes' answers went to a
        prefix no longer read."""
        if self._nc is nc:
            return
        async with self._subscribing:
            if self._nc is nc:
                return
            prefix = nc.new_inbox() + "."
            self._sub = await nc.subscribe(prefix + "*", cb=self._on_answer, pending_msgs_limit=-1,
                                           pending_bytes_limit=-1)
            self._nc, self._prefix = nc, prefix

    def reply_to(self, waiter: Waiter, index: int) -> str:
        """The reply subject of ``waiter``'s message ``index``."""
        self._next += 1
        token = str(self._next)
        self._waiting[token] = (waiter, index)
        waiter.tokens.append(token)
        return self._prefix + token

    def forget(self, waiter: Waiter) -> None:
        """``waiter`` gave up (a deadline, a cancel, a failed send): its late answers are dropped."""
        waiting = self._waiting
        for token in waiter.tokens:
            waiting.pop(token, None)

    async def _on_answer(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if entry is None:
            return  # its publish gave up already
        waiter, index = entry
        error: Exception | None = None
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            error = nats.js.errors.NoStreamResponseError()
        elif b'"error"' in msg.data:  # an ack names a stream and a sequence, never this
            try:
                nats.js.errors.APIError.from_error(json.loads(msg.data)["error"])  # raises it (nats-py 2.x)
            except nats.js.errors.APIError as exc:
                error = exc
            except (ValueError, KeyError, TypeError) as exc:
                error = exc
        if error is not None:
            waiter.errors[index] = error
        waiter.left -= 1
        if waiter.left <= 0 and not waiter.future.done():
            waiter.future.set_result(None)
