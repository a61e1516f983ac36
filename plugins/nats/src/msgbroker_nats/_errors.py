"""nats-py's errors mapped into msgbroker's one exception tree, at the edge; and what a NATS
server refuses on a connection (its credentials, a subject permission), as AccessDeniedError.

A NATS server refuses a permission quietly: the refused publish or subscription is dropped, the
connection stays open, and an ``-ERR 'Permissions Violation for Publish to "<subject>"'`` comes
back on its own; nats-py hands it to the error callback and nothing else. So a refused request
would wait out its timeout, a refused JetStream publish its ack timeout, and a refused pull
request forever. :class:`RefusingClient` makes those refusals an :class:`AccessDeniedError` of
the operation that met them: it confirms the first publish and subscription of each kind of
subject with a PING (the server answers it after the ``-ERR`` of what came before it), and from
then on fails at once what the server refused. docs/security.md lists the permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from msgbroker.spi import (
    AccessDeniedError,
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    MsgBrokerError,
)
from nats.aio.msg import Msg
from nats.aio.subscription import DEFAULT_SUB_PENDING_BYTES_LIMIT, DEFAULT_SUB_PENDING_MSGS_LIMIT, Subscription

from . import _compat

__all__ = ["PermissionRefused", "Refusals", "RefusingClient", "map_error", "redacted", "user_of"]

_VIOLATION = re.compile(r"permissions violation for (publish|subscription) to \"?([^\"\s']+)", re.IGNORECASE)
_CREDENTIALS = ("authorization violation", "authorization failed", "user authentication expired",
                "user authentication revoked")
_CONFIRM_TIMEOUT = 2
"""Seconds a first publish or subscription of a kind waits for the server's answer to a PING."""
_READING = ("$js.ack", "$js.api.consumer.msg.next", "$js.api.consumer.info", "$js.api.consumer.durable.create",
            "$kv", "$js.api.direct.get", "_inbox", "_msgbroker_nats")
"""Kinds of subject a subscription cannot read without (acks, pull requests, its consumers, its
leases and records, replies and deliveries, the group's announcements): once one is refused, no
pull request is sent any more on the connection."""


def redacted(url: str) -> str:
    """``url`` (one server URL or several, comma-separated) without passwords or tokens."""
    out = []
    for one in url.split(","):
        try:
            parts = urlsplit(one.strip())
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
        except ValueError:
            out.append("<a server URL that does not parse>")
            continue
        if parts.password is not None:
            out.append(urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}")))
        elif parts.username:  # nats://TOKEN@host: the user part is a secret token
            out.append(urlunsplit(parts._replace(netloc=f"***@{host}")))
        else:
            out.append(one.strip())
    return ",".join(out)


def user_of(url: str) -> str | None:
    """The user a URL logs in as (``nats://USER:PASSWORD@host``); None for a token or no login."""
    for one in url.split(","):
        with contextlib.suppress(ValueError):
            parts = urlsplit(one.strip())
            if parts.username and parts.password is not None:
                return parts.username
    return None


class PermissionRefused(AccessDeniedError):
    """Raised by :class:`RefusingClient` for a refused subject; ``map_error`` names the operation."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"nats: {detail}")
        self.detail = detail


def _again(error: AccessDeniedError) -> AccessDeniedError:
    """A new exception like ``error``: raising one instance again and again would grow its traceback."""
    if isinstance(error, PermissionRefused):
        return PermissionRefused(error.detail)
    return AccessDeniedError(str(error))


def _kind(subject: str) -> str:
    """The part of a subject one permission of docs/security.md covers: the ack subjects of one
    consumer, the keys of one KV bucket (and its direct gets), every inbox, the announcements;
    any other subject stands for itself (a topic's partition, one JetStream API request). In lower
    case: nats-py hands the server's error text on in lower case, subjects included. Asked for
    every publish (each ack has a subject of its own, so a cache only missed): the first token
    decides how much of the rest is split."""
    head, _, rest = subject.partition(".")
    first = head.lower()
    if first in ("_inbox", "_msgbroker_nats"):
        return first
    if first == "$kv":
        return f"$kv.{rest.partition('.')[0].lower()}" if rest else first
    if first == "$js":
        tokens = subject.lower().split(".", 5)
        if tokens[1:2] == ["ack"]:
            return ".".join(tokens[:4])
        if tokens[1:4] == ["api", "direct", "get"]:
            return ".".join(tokens[:5])
    return subject.lower()


class Refusals:
    """What the server refused on one connection: its credentials, and subjects it may not publish
    or subscribe to (the first refusal of each kind of subject, see :func:`_kind`). Errors name the
    server (without passwords) and the user, never the password."""

    def __init__(self, url: str, nkey: str | None = None) -> None:
        self.where = redacted(url)
        user = user_of(url)
        self.who = f"nkey user {nkey!r}" if nkey else f"user {user!r}" if user else "this connection's login"
        self.why = "an nkey the server does not know" if nkey else "a wrong password or an unknown user"
        self.credentials: AccessDeniedError | None = None
        """Set when the server refused the credentials (Authorization Violation)."""
        self.reading: AccessDeniedError | None = None
        """The first refusal a subscription cannot read without (credentials, or see _READING)."""
        self.refused: dict[tuple[str, str], PermissionRefused] = {}
        self.allowed: set[tuple[str, str]] = set()
        """(publish|subscribe, kind) the server answered without refusing."""

    def note(self, exc: BaseException) -> tuple[AccessDeniedError | None, bool]:
        """(the AccessDeniedError, new) for an error the server sent, (None, False) for others."""
        text = str(exc)
        found = _VIOLATION.search(text)
        if found is not None:
            verb = "publish" if found[1].lower() == "publish" else "subscribe"
            subject = found[2]
            key = (verb, _kind(subject))
            if key in self.refused:
                return self.refused[key], False
            error = self._refusal(verb, subject, " (the subject as nats-py reports it, in lower case)")
            self.refused[key] = error
            self.allowed.discard(key)
            if self.reading is None and key[1].startswith(_READING):
                self.reading = error
            return error, True
        lowered = text.lower()
        if isinstance(exc, nats.errors.AuthorizationError) or any(word in lowered for word in _CREDENTIALS):
            new = self.credentials is None
            if new:
                self.credentials = AccessDeniedError(
                    f"nats: connecting to {self.where} failed: the server refused the credentials of {self.who} "
                    f"(Authorization Violation: {self.why})"
                )
                self.reading = self.reading or self.credentials
            return self.credentials, new
        return None, False

    def _refusal(self, verb: str, subject: str, note: str = "") -> PermissionRefused:
        what = "Publish" if verb == "publish" else "Subscription"
        return PermissionRefused(
            f"{self.who} may not {verb} to {subject!r}{note} on {self.where}: the server says Permissions "
            f"Violation for {what}; grant the permissions docs/security.md lists"
        )

    def check(self, verb: str, subject: str) -> None:
        """Raise what the server refused for ``subject`` before (a pull once reading was refused)."""
        if not self.refused and self.reading is None:
            return  # nothing refused on this connection (every publish asks)
        if (verb, _kind(subject)) in self.refused:
            raise self._refusal(verb, subject)
        if self.reading is not None and subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            raise _again(self.reading)

    def check_request(self, subject: str) -> None:
        self.check("publish", subject)
        refused = self.refused.get(("subscribe", "_inbox"))
        if refused is not None:
            raise _again(refused)  # the replies cannot come

    async def confirm(self, verb: str, subject: str, flush: Callable[[], Awaitable[None]], connected: bool) -> None:
        """After the first publish or subscription of a kind: one round trip, then raise what the
        server refused meanwhile. Not while (re)connecting: the next one asks again."""
        key = (verb, _kind(subject))
        if key in self.allowed or not connected:
            return
        try:
            await flush()
        except asyncio.CancelledError:
            raise
        except Exception:
            return
        self.check(verb, subject)
        self.allowed.add(key)


class RefusingClient(_compat.Client):
    """nats-py's client (with the fixes of ``_compat.Client``) that raises :class:`PermissionRefused`
    for what the server refuses instead of waiting for an answer that never comes (see the module's
    docstring)."""

    def __init__(self, refusals: Refusals) -> None:
        super().__init__()
        self.refusals = refusals

    async def _flush(self) -> None:
        # Twice: nats-py (2.16) writes a flush's PING to the socket at once, ahead of what is
        # still buffered for its flusher task, so the first PONG may come before the server saw
        # the publish; the flusher writes the buffer while the first PING is on its way.
        await self.flush(timeout=_CONFIRM_TIMEOUT)
        await self.flush(timeout=_CONFIRM_TIMEOUT)

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        refusals = self.refusals
        refusals.check("publish", subject)
        await super().publish(subject, payload, reply, headers)
        if ("publish", _kind(subject)) not in refusals.allowed:  # every ack comes here: no await when known
            await refusals.confirm("publish", subject, self._flush, self.is_connected)

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[Msg], Awaitable[None]] | None = None,
        future: asyncio.Future[Any] | None = None,
        max_msgs: int = 0,
        pending_msgs_limit: int = DEFAULT_SUB_PENDING_MSGS_LIMIT,
        pending_bytes_limit: int = DEFAULT_SUB_PENDING_BYTES_LIMIT,
    ) -> Subscription:
        self.refusals.check("subscribe", subject)
        sub = await super().subscribe(subject, queue, cb, future, max_msgs, pending_msgs_limit, pending_bytes_limit)
        try:
            await self.refusals.confirm("subscribe", subject, self._flush, self.is_connected)
        except PermissionRefused:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise
        return sub

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5, old_style: bool = False,
                      headers: dict[str, Any] | None = None) -> Msg:
        self.refusals.check_request(subject)
        try:
            return await super().request(subject, payload, timeout, old_style, headers)
        except nats.errors.TimeoutError:
            self.refusals.check_request(subject)  # refused while it waited (a permission taken away)
            raise


_T = TypeVar("_T")

LEADERLESS_FOR = 2.0
"""How long a write to a KV bucket waits for its stream to answer again when it has no leader (a
cluster electing one after a node restarted answers "no responders"): a subscribe in that moment
failed where a second later it would not have."""
_LEADERLESS = (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)


async def through_elections(call: Callable[[], Awaitable[_T]], within: float = LEADERLESS_FOR) -> _T:
    """``call()``, made again every 0.1 s for up to ``within`` seconds while JetStream answers
    "no responders". That answer means nothing was stored, so making it again is safe."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await call()
        except _LEADERLESS:
            if asyncio.get_running_loop().time() >= deadline:
                raise
        await asyncio.sleep(0.1)


def map_error(exc: BaseException, doing: str) -> MsgBrokerError:
    """The msgbroker error for a native one (``raise map_error(exc, "...") from exc``)."""
    if isinstance(exc, PermissionRefused):
        return AccessDeniedError(f"nats: {doing} failed: {exc.detail}")
    if isinstance(exc, MsgBrokerError):
        return exc
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BrokerTimeoutError(f"nats: timed out {doing}")
    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                        nats.js.errors.ServiceUnavailableError)):
        return BrokerUnavailableError(f"nats: JetStream did not answer {doing} (is JetStream enabled?)")
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.NoServersError, nats.errors.StaleConnectionError,
                        nats.errors.ConnectionReconnectingError, nats.errors.ConnectionDrainingError,
                        nats.errors.OutboundBufferLimitError, OSError)):
        return BrokerConnectionError(f"nats: connection failed {doing}: {type(exc).__name__} {exc}")
    if isinstance(exc, nats.js.errors.APIError):
        return MsgBrokerError(f"nats: JetStream refused {doing}: {exc.description} "
                              f"(code {exc.code}, err_code {exc.err_code})")
    return MsgBrokerError(f"nats: {doing} failed: {type(exc).__name__}: {exc}")
