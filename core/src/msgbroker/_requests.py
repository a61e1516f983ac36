"""Request/reply: the requester's side (``Broker.request``) and the handler's side (the reply a
handler's returned message becomes). docs/semantics.md, "Request and reply"."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from ._errors import RequestFailedError, RequestTimeoutError, SerializationError
from ._message import Message
from .wire import DEAD_LETTER_ERROR, REPLY_STATUS_HEADER, REPLY_TO_HEADER

if TYPE_CHECKING:
    from ._provider import Transport

__all__ = ["Requests", "dead_letter_reply", "reply_address", "reply_of"]

log = logging.getLogger("msgbroker")

R = TypeVar("R", bound=Message)

OK = "ok"
DEAD_LETTERED = "dead-lettered"


class Requests:
    """One broker's requests in flight: its reply inbox (opened at the first request) and a
    future per request id."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._address: str | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[tuple[Mapping[str, str], bytes]]] = {}

    async def address(self) -> str:
        """The reply address of this broker's connection (the inbox opens on first use)."""
        if self._address is None:
            async with self._opening:
                if self._address is None:
                    self._address = await self._transport.open_replies(self._deliver)
        return self._address

    def expect(self, request_id: str) -> asyncio.Future[tuple[Mapping[str, str], bytes]]:
        future: asyncio.Future[tuple[Mapping[str, str], bytes]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def _deliver(self, request_id: str, headers: Mapping[str, str], body: bytes) -> None:
        future = self._waiting.pop(request_id, None)
        if future is None or future.done():
            log.debug("msgbroker: a reply to %s that nobody awaits (answered already, or timed out)", request_id)
            return
        future.set_result((headers, body))

    def fail_all(self, error: BaseException) -> None:
        """The broker closes: every request still waiting ends with ``error``."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)


async def await_reply(
    future: asyncio.Future[tuple[Mapping[str, str], bytes]],
    topic: str,
    request_id: str,
    timeout: float,
    reply_type: type[R] | None,
) -> R | Any:
    """The reply to one request, decoded; :class:`RequestTimeoutError` after ``timeout``."""
    try:
        headers, body = await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise RequestTimeoutError(
            f"no reply to request {request_id} on {topic!r} within {timeout:g}s "
            "(the request may still be handled later)"
        ) from None
    status = headers.get(REPLY_STATUS_HEADER, OK)
    if status == DEAD_LETTERED:
        raise RequestFailedError(
            f"request {request_id} on {topic!r} was dead-lettered: {headers.get(DEAD_LETTER_ERROR, 'no reason given')}"
        )
    if status != OK:
        raise RequestFailedError(f"request {request_id} on {topic!r}: a reply of unknown status {status!r}")
    if body == b"null":
        return None
    if reply_type is None:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise SerializationError(f"the reply to request {request_id} on {topic!r} is not JSON: {exc}") from exc
    try:
        return reply_type.__pydantic_validator__.validate_json(body)
    except ValidationError as exc:
        raise SerializationError(
            f"cannot decode the reply to request {request_id} on {topic!r} as {reply_type.__name__}: {exc}"
        ) from exc


def reply_address(headers: Mapping[str, str]) -> str | None:
    """The requester's address when a delivery is a request."""
    return headers.get(REPLY_TO_HEADER) if headers else None


def reply_of(result: object, topic: str, message_id: str) -> tuple[dict[str, str], bytes]:
    """What a handler's return value sends back: a message's JSON, or ``null`` for None."""
    if result is None:
        return {REPLY_STATUS_HEADER: OK}, b"null"
    if not isinstance(result, Message):
        raise SerializationError(
            f"the handler of request {message_id} on {topic!r} returned {type(result).__name__}: "
            "a reply must be a msgbroker.Message (or None)"
        )
    return {REPLY_STATUS_HEADER: OK}, result.__pydantic_serializer__.to_json(result)


def dead_letter_reply(error: str) -> tuple[dict[str, str], bytes]:
    """The reply a dead-lettered request sends: its status and the dead letter's error."""
    return {REPLY_STATUS_HEADER: DEAD_LETTERED, DEAD_LETTER_ERROR: error}, b""
