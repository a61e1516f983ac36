"""Metrics through the publish/handle hooks: a Prometheus scrape of a test registry, OpenTelemetry
metrics on an in-memory reader, pending and circuit breaker gauges, and third-party hooks."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import msgbroker
import msgbroker.metrics
import pytest
from msgbroker import HandleEvent, Message, MessageContext, PublishEvent, hookimpl, registry
from msgbroker.resilience import CircuitBreaker
from msgbroker.testing import eventually
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families


class Order(Message):
    n: int


def url() -> str:
    return f"memory://metrics-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def prometheus() -> Iterator[tuple[CollectorRegistry, msgbroker.metrics.MessagingMetrics]]:
    target = CollectorRegistry()
    plugin = msgbroker.metrics.instrument(registry=target, otel=False)
    try:
        yield target, plugin
    finally:
        msgbroker.metrics.uninstrument()


def scrape(target: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics from a real HTTP endpoint on loopback, parsed."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=target)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(group: str | None = None, **extra: str) -> tuple[tuple[str, str], ...]:
    base = {"messaging_system": "memory", "messaging_destination_name": "orders", **extra}
    if group is not None:
        base["messaging_consumer_group_name"] = group
    return tuple(sorted(base.items()))


async def handle_by_outcome(ctx: MessageContext[Order]) -> None:
    """n=0 acks, n=1 is dead-lettered, n=2 is delayed once, then acked."""
    if ctx.message.n == 1:
        await ctx.nak(requeue=False)
    elif ctx.message.n == 2 and ctx.delivery_attempt == 1:
        await ctx.delay(0.01)


async def test_publishes_and_handling_by_outcome_appear_in_a_prometheus_scrape(
    prometheus: tuple[CollectorRegistry, msgbroker.metrics.MessagingMetrics],
) -> None:
    target, _ = prometheus
    async with msgbroker.connect(url(), partition_count=4) as broker:
        await broker.publish("orders", Order(n=0))
        await broker.publish_batch("orders", [Order(n=1), Order(n=2)])
        subscription = await broker.subscribe("orders", "billing", handle_by_outcome)
        await eventually(lambda: _settled(broker), what="every order settled")
        await subscription.close()
    samples = scrape(target)
    assert samples[("messaging_client_sent_messages_total", labels())] == 3
    assert (
        samples[("messaging_client_operation_duration_seconds_count", labels(messaging_operation_name="send"))] == 2
    )  # one publish, one batch
    consumed = "messaging_client_consumed_messages_total"
    assert samples[(consumed, labels("billing", outcome="ack"))] == 2
    assert samples[(consumed, labels("billing", outcome="dead_letter"))] == 1
    assert samples[(consumed, labels("billing", outcome="delay"))] == 1
    assert samples[("messaging_process_duration_seconds_count", labels("billing", outcome="ack"))] == 2
    assert samples[("msgbroker_messages_in_flight", labels("billing"))] == 0


async def _settled(broker: msgbroker.Broker) -> bool:
    return await broker.pending_count("orders", "billing") == 0


async def test_pending_gauge_is_refreshed_by_the_watcher(
    prometheus: tuple[CollectorRegistry, msgbroker.metrics.MessagingMetrics],
) -> None:
    target, plugin = prometheus
    async with msgbroker.connect(url(), partition_count=4) as broker:
        await broker.publish_batch("orders", [Order(n=n) for n in range(5)])
        assert await plugin.refresh_pending(broker, [("orders", "billing")]) == {("orders", "billing"): 5}
        assert scrape(target)[("msgbroker_messages_pending", labels("billing"))] == 5
        watcher = plugin.watch_pending(broker, [("orders", "billing")], interval=0.05)
        subscription = await broker.subscribe("orders", "billing", handle_by_outcome)
        await eventually(
            lambda: target.get_sample_value("msgbroker_messages_pending", dict(labels("billing"))) == 0,
            what="pending gauge at 0",
        )
        await subscription.close()
        watcher.cancel()


async def test_circuit_breaker_state_and_transitions(
    prometheus: tuple[CollectorRegistry, msgbroker.metrics.MessagingMetrics],
) -> None:
    target, plugin = prometheus
    now = [0.0]
    breaker = CircuitBreaker(
        name="seat-service", minimum_throughput=2, failure_ratio=0.5, break_duration=10, clock=lambda: now[0]
    )
    plugin.watch_breaker(breaker)

    def state() -> dict[str, float | None]:
        return {
            s: target.get_sample_value("msgbroker_circuit_breaker_state", {"breaker": "seat-service", "state": s})
            for s in msgbroker.metrics.BREAKER_STATES
        }

    assert state() == {"closed": 1, "open": 0, "half_open": 0}
    for _ in range(2):
        breaker.record_failure(breaker.acquire(), ConnectionError("down"))
    assert state() == {"closed": 0, "open": 1, "half_open": 0}
    now[0] = 11.0
    breaker.record_success(breaker.acquire())  # the half-open trial succeeds
    assert state() == {"closed": 1, "open": 0, "half_open": 0}
    transitions = {
        s: target.get_sample_value(
            "msgbroker_circuit_breaker_transitions_total", {"breaker": "seat-service", "state": s}
        )
        for s in ("open", "half_open", "closed")
    }
    assert transitions == {"open": 1, "half_open": 1, "closed": 1}
    plugin.close()
    assert breaker._listeners == []


async def test_opentelemetry_metrics() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    plugin = msgbroker.metrics.instrument(meter_provider=provider, prometheus=False)
    try:
        async with msgbroker.connect(url(), partition_count=4) as broker:
            await broker.publish_batch("orders", [Order(n=0), Order(n=1)])
            await plugin.refresh_pending(broker, [("orders", "billing")])
            subscription = await broker.subscribe("orders", "billing", handle_by_outcome)
            await eventually(lambda: _settled(broker))
            await subscription.close()
    finally:
        msgbroker.metrics.uninstrument()
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    provider.shutdown()
    [sent] = points["messaging.client.sent.messages"]
    assert sent.value == 2 and sent.attributes["messaging.destination.name"] == "orders"
    consumed = {p.attributes["msgbroker.outcome"]: p.value for p in points["messaging.client.consumed.messages"]}
    assert consumed == {"ack": 1, "dead_letter": 1}
    assert sum(p.count for p in points["messaging.process.duration"]) == 2
    [in_flight] = points["msgbroker.messages.in_flight"]
    assert in_flight.value == 0
    [pending] = points["msgbroker.messages.pending"]
    assert pending.value == 2 and pending.attributes["messaging.consumer.group.name"] == "billing"


class AuditPlugin:
    """A third-party plugin on the same hooks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int, bool]] = []
        self.handled: list[tuple[str, int, str | None]] = []

    @hookimpl
    def msgbroker_publish(self, event: PublishEvent) -> AbstractContextManager[None]:
        for record in event.records:
            record.headers["x-audit"] = "yes"
        return self._published(event)

    @contextmanager
    def _published(self, event: PublishEvent) -> Iterator[None]:
        yield
        self.published.append((event.topic, len(event.records), event.replay))

    @hookimpl
    def msgbroker_handle(self, event: HandleEvent) -> None:
        self.handled.append((event.message_id, event.delivery_attempt, event.headers.get("x-audit")))


async def test_a_third_party_plugin_sees_publishes_and_handling_and_may_add_headers() -> None:
    audit = AuditPlugin()
    registry.register(audit, name="test-audit")
    try:
        async with msgbroker.connect(url(), partition_count=4) as broker:
            ids = await broker.publish_batch("orders", [Order(n=0), Order(n=1)])
            subscription = await broker.subscribe("orders", "billing", handle_by_outcome)
            await eventually(lambda: _settled(broker))
            await subscription.close()
            await broker.replay_dead_letters("orders", "billing")
    finally:
        registry.plugins.unregister(name="test-audit")
    assert audit.published == [("orders", 2, False), ("orders", 1, True)]
    assert sorted(audit.handled) == sorted((i, 1, "yes") for i in ids)


async def test_no_plugin_no_hook_calls() -> None:
    async with msgbroker.connect(url()) as broker:
        assert broker.producer.observed is False
        subscription = await broker.subscribe("orders", "billing", handle_by_outcome)
        assert subscription._runner._observed is False
        await subscription.close()


def test_instrument_twice_on_one_registry_shares_the_instruments() -> None:
    target = CollectorRegistry()
    try:
        first = msgbroker.metrics.instrument(registry=target, otel=False)
        second = msgbroker.metrics.instrument(registry=target, otel=False)
        assert first.backends == second.backends
        assert registry.plugins.get_plugin(msgbroker.metrics.PLUGIN_NAME) is second
    finally:
        msgbroker.metrics.uninstrument()
    assert registry.plugins.get_plugin(msgbroker.metrics.PLUGIN_NAME) is None
