"""``ResilientMessageHandler``: a message handler under the resilience pipeline, settled for you."""

from __future__ import annotations

import asyncio
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._errors import is_transient
from .._message import Message, MessageContext
from ._breaker import BrokenCircuitError
from ._context import ResilienceContext
from ._service import ResilienceService

__all__ = ["ResilientMessageHandler"]

log = logging.getLogger("msgbroker.resilience")

M = TypeVar("M", bound=Message)


class ResilientMessageHandler:
    """Runs message processing under a :class:`ResilienceService` and settles the context
    (the seed's ``IResilientMessageHandler``):

    * success → ``ctx.ack()``;
    * a transient failure left after the in-call retries → ``ctx.nak(requeue=True, error=...)``:
      the message comes back and its ``delivery_attempt`` rises toward the dead letter
      (``BrokerSettings.max_retry_attempts``);
    * a permanent (non-transient) failure → ``ctx.nak(requeue=False, error=...)``: dead-lettered
      at once with the error;
    * the circuit is open → ``ctx.delay(retry_after)``: redelivered when the break is over,
      without using up a delivery attempt.

    Cancellation (shutdown) propagates and leaves the message unsettled, so it is redelivered.
    If ``fn`` settles the context itself (it cannot, as it gets only the message, unless it
    closes over it), nothing is settled twice.
    """

    def __init__(self, service: ResilienceService | None = None) -> None:
        self.service = service if service is not None else ResilienceService()

    async def handle(self, ctx: MessageContext[M], fn: Callable[[M], Awaitable[object]]) -> None:
        """Run ``await fn(ctx.message)`` resiliently and settle ``ctx`` by the outcome."""
        context = ResilienceContext(operation_name=f"handle {ctx.topic}", message_id=ctx.message_id, topic=ctx.topic)
        try:
            await self.service.execute(fn, ctx.message, context=context)
        except BrokenCircuitError as exc:
            if ctx.settled is None:
                log.info(
                    "msgbroker.resilience: %s: circuit open, delaying the message %.3fs (attempt %d)",
                    context.describe(),
                    exc.retry_after,
                    ctx.delivery_attempt,
                )
                await ctx.delay(exc.retry_after)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if ctx.settled is not None:
                log.warning(
                    "msgbroker.resilience: %s failed after it was settled (%s): %r",
                    context.describe(),
                    ctx.settled,
                    exc,
                )
            elif is_transient(exc):
                log.info(
                    "msgbroker.resilience: %s: transient failure left after retries, requeued "
                    "(delivery attempt %d): %r",
                    context.describe(),
                    ctx.delivery_attempt,
                    exc,
                )
                await ctx.nak(requeue=True, error=exc)
            else:
                log.warning("msgbroker.resilience: %s: permanent failure, dead-lettering: %r", context.describe(), exc)
                await ctx.nak(requeue=False, error=exc)
        else:
            if ctx.settled is None:
                await ctx.ack()

    def wrap(self, fn: Callable[[M], Awaitable[object]]) -> Callable[[MessageContext[M]], Awaitable[None]]:
        """A broker handler that runs ``fn`` through :meth:`handle`.

        The message type of ``fn``'s first parameter annotation (``async def lock(message:
        SeatLockMessage)``) becomes the handler's ``MessageContext[SeatLockMessage]``
        annotation, so ``subscribe`` decodes to it without ``message_type=``.
        """

        async def handler(ctx: MessageContext[Any]) -> None:
            await self.handle(ctx, fn)

        # Copy the name, not __wrapped__: subscribe reads the signature of the handler itself.
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attribute):
                setattr(handler, attribute, getattr(fn, attribute))
        message_type = _first_parameter_type(fn)
        handler.__annotations__ = {
            "ctx": MessageContext[message_type] if message_type is not None else MessageContext[Any],  # type: ignore[valid-type]
            "return": None,
        }
        return handler


def _first_parameter_type(fn: Callable[..., Any]) -> type[Message] | None:
    try:
        hints = typing.get_type_hints(fn)
        params = list(inspect.signature(fn).parameters)
    except (NameError, TypeError, ValueError):
        return None
    hint = hints.get(params[0]) if params else None
    return hint if isinstance(hint, type) and issubclass(hint, Message) else None
