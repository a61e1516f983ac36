"""Tracing: a producer span per publish, a consumer span per handling, linked through the W3C
trace context in the message headers (OpenTelemetry SDK, in-memory exporter)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import msgbroker
import msgbroker.otel
import pytest
from msgbroker import Message, MessageContext
from msgbroker.testing import eventually
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode


class SeatLock(Message):
    session: str
    seat: str = "R1-1"

    @property
    def partition_key(self) -> str:
        return self.session


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    msgbroker.otel.instrument(provider)
    try:
        yield spans, provider
    finally:
        msgbroker.otel.uninstrument()
        provider.shutdown()


def url() -> str:
    return f"memory://otel-{uuid.uuid4().hex[:8]}"


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


async def test_one_publish_and_one_handle_make_two_linked_spans(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, _ = exporter
    seen: list[MessageContext[SeatLock]] = []

    async def handle(ctx: MessageContext[SeatLock]) -> None:
        seen.append(ctx)

    async with msgbroker.connect(url(), partition_count=8) as broker:
        message = SeatLock(session="s-1")
        message_id = await broker.publish("seat-locks", message)
        subscription = await broker.subscribe("seat-locks", "workers", handle)
        await eventually(lambda: len(spans.get_finished_spans()) == 2, what="two spans")
        await subscription.close()

    producer, consumer = (by_kind(spans.get_finished_spans(), k)[0] for k in (SpanKind.PRODUCER, SpanKind.CONSUMER))
    assert len(spans.get_finished_spans()) == 2
    assert producer.name == "send seat-locks" and consumer.name == "process seat-locks"
    # one trace: the consumer span is the producer's child and links to it
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]
    # the context travelled in the headers
    traceparent = seen[0].headers["traceparent"]
    assert traceparent.split("-")[1:3] == [f"{producer.context.trace_id:032x}", f"{producer.context.span_id:016x}"]

    partition = str(msgbroker.partition_for("s-1", 8))
    assert dict(producer.attributes or {}) == {
        "messaging.system": "memory",
        "messaging.destination.name": "seat-locks",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.partition.id": partition,
        "messaging.message.id": message_id,
        "messaging.message.body.size": producer.attributes["messaging.message.body.size"],  # type: ignore[index]
    }
    attributes = consumer.attributes or {}
    assert attributes["messaging.system"] == "memory"
    assert attributes["messaging.destination.name"] == "seat-locks"
    assert attributes["messaging.destination.partition.id"] == partition
    assert attributes["messaging.message.id"] == message_id
    assert attributes["messaging.consumer.group.name"] == "workers"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["msgbroker.delivery_attempt"] == 1
    assert attributes["msgbroker.outcome"] == "ack"
    assert consumer.status.status_code is not StatusCode.ERROR


async def test_correlation_id_comes_from_the_current_trace(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, provider = exporter
    tracer = provider.get_tracer("api-server")
    async with msgbroker.connect(url(), partition_count=4) as broker:
        with tracer.start_as_current_span("POST /seat-locks") as request:
            message = SeatLock(session="s-2")
            await broker.publish("seat-locks", message)
        explicit = SeatLock(session="s-2", correlation_id="order-42")
        await broker.publish("seat-locks", explicit)
        subscription = await broker.subscribe("seat-locks", "workers", _ack)
        await eventually(lambda: len(by_kind(spans.get_finished_spans(), SpanKind.CONSUMER)) == 2)
        await subscription.close()
    trace_id = request.get_span_context().trace_id
    assert message.correlation_id is not None and f"{trace_id:032x}" in message.correlation_id
    send = [s for s in by_kind(spans.get_finished_spans(), SpanKind.PRODUCER)]
    assert send[0].parent is not None and send[0].parent.span_id == request.get_span_context().span_id
    conversations = [
        s.attributes["messaging.message.conversation_id"]  # type: ignore[index]
        for s in by_kind(spans.get_finished_spans(), SpanKind.CONSUMER)
    ]
    assert conversations == [message.correlation_id, "order-42"]


async def _ack(ctx: MessageContext[SeatLock]) -> None:
    await ctx.ack()


async def test_a_batch_gets_a_create_span_per_message_that_its_handling_follows(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, _ = exporter
    async with msgbroker.connect(url(), partition_count=4) as broker:
        await broker.publish_batch("seat-locks", [SeatLock(session=f"s-{n}") for n in range(3)])
        subscription = await broker.subscribe("seat-locks", "workers", _ack)
        await eventually(lambda: len(by_kind(spans.get_finished_spans(), SpanKind.CONSUMER)) == 3)
        await subscription.close()
    finished = spans.get_finished_spans()
    [send] = by_kind(finished, SpanKind.CLIENT)
    assert send.attributes["messaging.batch.message_count"] == 3  # type: ignore[index]
    creates = {s.attributes["messaging.message.id"]: s for s in by_kind(finished, SpanKind.PRODUCER)}  # type: ignore[index]
    assert len(creates) == 3
    for create in creates.values():
        assert create.name == "create seat-locks" and create.parent.span_id == send.context.span_id  # type: ignore[union-attr]
    for consumer in by_kind(finished, SpanKind.CONSUMER):
        create = creates[consumer.attributes["messaging.message.id"]]  # type: ignore[index]
        assert consumer.parent.span_id == create.context.span_id  # type: ignore[union-attr]


async def test_failed_handling_is_an_error_span_per_attempt_until_the_dead_letter(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, _ = exporter

    async def fail(ctx: MessageContext[SeatLock]) -> None:
        raise RuntimeError("seat service down")

    async with msgbroker.connect(url(), partition_count=4, max_retry_attempts=2, retry_delay=0) as broker:
        await broker.publish("seat-locks", SeatLock(session="s-3"))
        subscription = await broker.subscribe("seat-locks", "workers", fail)
        await eventually(lambda: len(by_kind(spans.get_finished_spans(), SpanKind.CONSUMER)) == 2)
        await eventually(lambda: broker.dead_letters("seat-locks", "workers"))
        await subscription.close()
    attempts = by_kind(spans.get_finished_spans(), SpanKind.CONSUMER)
    assert [s.attributes["msgbroker.delivery_attempt"] for s in attempts] == [1, 2]  # type: ignore[index]
    assert [s.attributes["msgbroker.outcome"] for s in attempts] == ["nak", "dead_letter"]  # type: ignore[index]
    for span in attempts:
        assert span.status.status_code is StatusCode.ERROR
        assert "seat service down" in (span.status.description or "")
        assert [e.name for e in span.events] == ["exception"]


async def test_a_replayed_dead_letter_links_its_first_trace(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, _ = exporter

    async def reject(ctx: MessageContext[SeatLock]) -> None:
        await ctx.nak(requeue=False)

    async with msgbroker.connect(url(), partition_count=4) as broker:
        await broker.publish("seat-locks", SeatLock(session="s-4"))
        subscription = await broker.subscribe("seat-locks", "workers", reject)
        await eventually(lambda: broker.dead_letters("seat-locks", "workers"))
        await subscription.close()
        first = by_kind(spans.get_finished_spans(), SpanKind.PRODUCER)[0]
        assert await broker.replay_dead_letters("seat-locks", "workers") == 1
    replay = by_kind(spans.get_finished_spans(), SpanKind.PRODUCER)[1]
    assert replay.attributes["msgbroker.replay"] is True  # type: ignore[index]
    assert [link.context.span_id for link in replay.links] == [first.context.span_id]


async def test_uninstrument_stops_tracing(exporter: tuple[InMemorySpanExporter, TracerProvider]) -> None:
    spans, _ = exporter
    msgbroker.otel.uninstrument()
    assert not msgbroker.otel.is_instrumented()
    async with msgbroker.connect(url()) as broker:
        await broker.publish("seat-locks", SeatLock(session="s-5"))
        done = asyncio.Event()

        async def handle(ctx: MessageContext[SeatLock]) -> None:
            done.set()

        subscription = await broker.subscribe("seat-locks", "workers", handle)
        await asyncio.wait_for(done.wait(), 10)
        await subscription.close()
    assert spans.get_finished_spans() == ()
