"""OpenTelemetry tracing for msgbroker (the ``msgbroker[otel]`` extra).

A producer span per publish and a consumer span per handling, with the W3C trace context
carried in the message headers (``traceparent``), so that a trace follows a message from the
API server that published it to the worker that handled it. Attributes follow the OpenTelemetry
messaging semantic conventions. It is a plugin on the ``msgbroker_publish`` and
``msgbroker_handle`` hooks, like any third-party one::

    import msgbroker.otel

    msgbroker.otel.instrument()          # before msgbroker.connect(...)

See docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from ._hookspecs import HandleEvent, PublishEvent, hookimpl
from ._registry import registry

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("msgbroker.otel needs OpenTelemetry: pip install 'msgbroker[otel]'") from exc

__all__ = [
    "ATTRIBUTES",
    "PLUGIN_NAME",
    "TracingPlugin",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

PLUGIN_NAME = "msgbroker.otel"
"""The name the tracing plugin is registered under."""

# Semantic-convention attribute names (messaging, v1.27+), and the two of our own.
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
PARTITION = "messaging.destination.partition.id"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BODY_SIZE = "messaging.message.body.size"
CONSUMER_GROUP = "messaging.consumer.group.name"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
BATCH_COUNT = "messaging.batch.message_count"
CLIENT_ID = "messaging.client.id"
DELIVERY_ATTEMPT = "msgbroker.delivery_attempt"
OUTCOME = "msgbroker.outcome"
REPLAY = "msgbroker.replay"

ATTRIBUTES = (
    SYSTEM,
    DESTINATION,
    PARTITION,
    MESSAGE_ID,
    CONVERSATION_ID,
    BODY_SIZE,
    CONSUMER_GROUP,
    OPERATION_TYPE,
    OPERATION_NAME,
    BATCH_COUNT,
    CLIENT_ID,
    DELIVERY_ATTEMPT,
    OUTCOME,
    REPLAY,
)
"""Every span attribute this module sets."""

_FAILED_OUTCOMES = frozenset({HandleEvent.NAK, HandleEvent.DEAD_LETTER, HandleEvent.FAILED})


def _version() -> str:
    from . import __version__

    return __version__


class TracingPlugin:
    """The hook implementations: one ``send`` span per publish (``create`` spans per message of
    a batch) and one ``process`` span per handling.

    ``parent_from_message=True`` makes the consumer span a child of the producer span (one trace
    from publish to handling); otherwise it starts in the handler's own context. Either way it
    carries a link to the producer span, as the semantic conventions ask.
    """

    def __init__(
        self, tracer_provider: trace.TracerProvider | None = None, *, parent_from_message: bool = True
    ) -> None:
        self.tracer = trace.get_tracer("msgbroker", _version(), tracer_provider=tracer_provider)
        self.parent_from_message = parent_from_message

    # -- publish -----------------------------------------------------------------------------

    @hookimpl
    def msgbroker_publish(self, event: PublishEvent) -> AbstractContextManager[object]:
        return self._publishing(event)

    @contextmanager
    def _publishing(self, event: PublishEvent) -> Iterator[None]:
        records = event.records
        attributes: dict[str, Any] = {
            SYSTEM: event.system,
            DESTINATION: event.topic,
            OPERATION_TYPE: "send",
            OPERATION_NAME: "send",
        }
        if event.replay:
            attributes[REPLAY] = True
        links = [link for r in records if (link := _link_from(r.headers)) is not None] if event.replay else []
        single = len(records) == 1
        if single:
            record = records[0]
            attributes.update(
                {PARTITION: str(record.partition), MESSAGE_ID: record.message_id, BODY_SIZE: len(record.body)}
            )
        else:
            attributes[BATCH_COUNT] = len(records)
        # One message: its send span is the producer span. A batch: a client "send" span and one
        # producer "create" span per message, whose context travels with that message.
        kind = SpanKind.PRODUCER if single else SpanKind.CLIENT
        with self.tracer.start_as_current_span(f"send {event.topic}", kind=kind, attributes=attributes, links=links):
            if single:
                propagate.inject(records[0].headers)
            else:
                for record in records:
                    create = self.tracer.start_span(
                        f"create {event.topic}",
                        kind=SpanKind.PRODUCER,
                        attributes={
                            SYSTEM: event.system,
                            DESTINATION: event.topic,
                            OPERATION_TYPE: "create",
                            OPERATION_NAME: "create",
                            PARTITION: str(record.partition),
                            MESSAGE_ID: record.message_id,
                            BODY_SIZE: len(record.body),
                        },
                    )
                    propagate.inject(record.headers, context=trace.set_span_in_context(create))
                    create.end()
            yield

    # -- handle ------------------------------------------------------------------------------

    @hookimpl
    def msgbroker_handle(self, event: HandleEvent) -> AbstractContextManager[object]:
        return self._handling(event)

    @contextmanager
    def _handling(self, event: HandleEvent) -> Iterator[None]:
        carried = propagate.extract(event.headers)
        producer = trace.get_current_span(carried).get_span_context()
        links = [Link(producer)] if producer.is_valid else []
        parent = carried if self.parent_from_message and producer.is_valid else None
        attributes: dict[str, Any] = {
            SYSTEM: event.system,
            DESTINATION: event.topic,
            CONSUMER_GROUP: event.group,
            PARTITION: str(event.partition),
            MESSAGE_ID: event.message_id,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            BODY_SIZE: event.body_size,
            CLIENT_ID: event.member_id,
            DELIVERY_ATTEMPT: event.delivery_attempt,
        }
        span = self.tracer.start_span(
            f"process {event.topic}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes, links=links
        )
        with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
            try:
                yield
            finally:
                _finish(span, event)


def _link_from(headers: Any) -> Link | None:
    context = trace.get_current_span(propagate.extract(headers)).get_span_context()
    return Link(context) if context.is_valid else None


def _finish(span: trace.Span, event: HandleEvent) -> None:
    if not span.is_recording():
        return
    if event.outcome is not None:
        span.set_attribute(OUTCOME, event.outcome)
    message = event.context.message if event.context is not None else None
    if message is not None and message.correlation_id:
        span.set_attribute(CONVERSATION_ID, message.correlation_id)
    error = event.error
    if isinstance(error, BaseException):
        span.record_exception(error)
    if event.outcome in _FAILED_OUTCOMES:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (error or event.outcome)
        span.set_status(Status(StatusCode.ERROR, str(text)))


def instrument(
    tracer_provider: trace.TracerProvider | None = None, *, parent_from_message: bool = True
) -> TracingPlugin:
    """Trace every publish and handling from now on (brokers and subscriptions opened after this
    call); returns the plugin. ``tracer_provider`` defaults to the global one. Calling it again
    replaces the earlier plugin."""
    uninstrument()
    plugin = TracingPlugin(tracer_provider, parent_from_message=parent_from_message)
    registry.register(plugin, name=PLUGIN_NAME)
    return plugin


def uninstrument() -> None:
    """Stop tracing (brokers and subscriptions opened after this call)."""
    if registry.plugins.has_plugin(PLUGIN_NAME):
        registry.plugins.unregister(name=PLUGIN_NAME)


def is_instrumented() -> bool:
    """Whether the tracing plugin is registered."""
    return registry.plugins.has_plugin(PLUGIN_NAME)
