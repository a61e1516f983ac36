"""The extension boundary: every hook msgbroker calls, in one file (pluggy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import pluggy

if TYPE_CHECKING:
    from ._message import MessageContext
    from ._provider import OutgoingRecord, Transport

__all__ = ["HandleEvent", "PublishEvent", "hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("msgbroker")
hookimpl = pluggy.HookimplMarker("msgbroker")


@dataclass(slots=True)
class PublishEvent:
    """One publish (or batch, or dead-letter replay) on its way to the broker."""

    system: str
    """The provider's name (``memory``, ``redis``, ``nats``, ``rabbitmq``, ``kafka``)."""
    topic: str
    records: Sequence[OutgoingRecord]
    """The encoded records; a hook may add to their ``headers`` (a trace context, say) before
    they are sent."""
    replay: bool = False
    """True when dead letters are published back to their topic."""


@dataclass(slots=True)
class HandleEvent:
    """One delivery of one message to a subscription, from its arrival to its settling."""

    ACK: ClassVar[str] = "ack"
    NAK: ClassVar[str] = "nak"
    DELAY: ClassVar[str] = "delay"
    DEAD_LETTER: ClassVar[str] = "dead_letter"
    FAILED: ClassVar[str] = "failed"
    """Settling itself failed (connection or lease lost): the broker delivers it again."""

    system: str
    topic: str
    group: str
    partition: int
    message_id: str
    delivery_attempt: int
    headers: Mapping[str, str]
    member_id: str
    body_size: int = 0
    context: MessageContext[Any] | None = None
    """The handler's context; None when the message never reached the handler (a payload
    that does not decode, or one delivered too often after crashes)."""
    outcome: str | None = None
    """Set when handling ended: ``ack``, ``nak``, ``delay``, ``dead_letter`` or ``failed``;
    None when it was interrupted (shutdown cancelled the handler)."""
    error: BaseException | str | None = None
    """What the handler raised, or why the message was dead-lettered."""


@hookspec
def msgbroker_providers() -> list[type[Transport]]:  # type: ignore[empty-body]
    """Return the provider classes this plugin offers.

    Each class subclasses :class:`msgbroker.Transport` and sets ``NAME`` (the
    ``BrokerSettings.provider`` value), ``SCHEMES`` (URL schemes) and ``CAPABILITIES``.
    Plugins are found through the entry-point group ``msgbroker.providers``.
    """


@hookspec
def msgbroker_publish(event: PublishEvent) -> AbstractContextManager[object] | None:
    """Observe a publish: return a context manager (or None) that is entered before the records
    are sent and left once the broker confirmed them (or with the error when it did not).

    Called in the publisher's task, so a context manager may make a span current. A broker
    looks up the implementations when it opens: register plugins before connecting.
    """


@hookspec
def msgbroker_handle(event: HandleEvent) -> AbstractContextManager[object] | None:
    """Observe the handling of one delivery: return a context manager (or None) that is entered
    before the message is decoded and the handler runs, and left after it was settled, with
    ``event.outcome`` and ``event.error`` filled in.

    Called in the handler's task, so a context manager may make a span current for the
    handler. A subscription looks up the implementations when it starts.
    """


def has_implementations(name: str, plugins: pluggy.PluginManager) -> bool:
    """Whether any registered plugin implements hook ``name`` (checked once per broker or
    subscription, so that the hot path skips hooks nobody listens to)."""
    caller = getattr(plugins.hook, name, None)
    return bool(caller is not None and caller.get_hookimpls())

