"""Metrics for msgbroker: Prometheus (the ``msgbroker[prometheus]`` extra) and OpenTelemetry
metrics (the ``msgbroker[otel]`` extra), recorded by one plugin on the publish and handle hooks.

::

    import msgbroker.metrics

    metrics = msgbroker.metrics.instrument()          # before msgbroker.connect(...)
    async with msgbroker.connect(url) as broker:
        metrics.watch_pending(broker, [("seat-lock-requests", "seat-lock-workers")])
        metrics.watch_breaker(resilience_service)     # circuit breaker state, if you use one
        ...

What is recorded (OpenTelemetry name — Prometheus name):

* ``messaging.client.sent.messages`` — ``messaging_client_sent_messages_total``: messages the
  broker confirmed, by system and topic;
* ``messaging.client.operation.duration`` — ``messaging_client_operation_duration_seconds``:
  how long a publish (one message or a batch) took until the broker confirmed it;
* ``messaging.client.consumed.messages`` — ``messaging_client_consumed_messages_total``: handled
  messages by outcome (``ack``, ``nak``, ``delay``, ``dead_letter``, ``failed``, ``interrupted``);
* ``messaging.process.duration`` — ``messaging_process_duration_seconds``: handling time (decode,
  handler and settle) by outcome;
* ``msgbroker.messages.in_flight`` — ``msgbroker_messages_in_flight``: handlers running now;
* ``msgbroker.messages.pending`` — ``msgbroker_messages_pending``: ``pending_count`` per (topic,
  group), refreshed by :meth:`MessagingMetrics.watch_pending` or :meth:`~MessagingMetrics.refresh_pending`;
* ``msgbroker.circuit_breaker.state`` — ``msgbroker_circuit_breaker_state``: 1 for the breaker's
  current state (``closed``, ``open``, ``half_open``), 0 for the others;
* ``msgbroker.circuit_breaker.transitions`` — ``msgbroker_circuit_breaker_transitions_total``.

Labels: ``messaging_system``, ``messaging_destination_name``, ``messaging_consumer_group_name``,
``outcome`` (OpenTelemetry: ``messaging.system``, ``messaging.destination.name``,
``messaging.consumer.group.name``, ``msgbroker.outcome``). Partitions are not a label (their
number times the topics would make too many series); traces carry them. See docs/observability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from ._hookspecs import HandleEvent, PublishEvent, hookimpl
from ._registry import registry as _plugins

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = [
    "BREAKER_STATES",
    "PLUGIN_NAME",
    "MessagingMetrics",
    "exposition",
    "instrument",
    "uninstrument",
]

log = logging.getLogger("msgbroker.metrics")

PLUGIN_NAME = "msgbroker.metrics"
"""The name the metrics plugin is registered under."""

BREAKER_STATES = ("closed", "open", "half_open")
"""The circuit breaker states, as in :class:`msgbroker.resilience.CircuitState`."""

INTERRUPTED = "interrupted"
"""The outcome label of a handling that shutdown cut short (the message comes back)."""

# Seconds; from a fast in-memory ack to a slow handler.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Backend(Protocol):
    def published(self, system: str, topic: str, count: int, seconds: float) -> None: ...
    def handled(self, system: str, topic: str, group: str, outcome: str, seconds: float) -> None: ...
    def in_flight(self, system: str, topic: str, group: str, delta: int) -> None: ...
    def pending(self, system: str, topic: str, group: str, count: int) -> None: ...
    def breaker(self, name: str, state: str, changed: bool) -> None: ...


class _Prometheus:
    """The instruments in one ``prometheus_client`` registry."""

    def __init__(self, target: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        dest = ["messaging_system", "messaging_destination_name"]
        group = [*dest, "messaging_consumer_group_name"]
        self.sent = Counter(
            "messaging_client_sent_messages", "Messages published and confirmed by the broker.", dest, registry=target
        )
        self.send_duration = Histogram(
            "messaging_client_operation_duration",
            "Time to publish a message or batch until confirmed.",
            [*dest, "messaging_operation_name"],
            unit="seconds",
            buckets=DURATION_BUCKETS,
            registry=target,
        )
        self.consumed = Counter(
            "messaging_client_consumed_messages", "Messages handled, by outcome.", [*group, "outcome"], registry=target
        )
        self.process_duration = Histogram(
            "messaging_process_duration",
            "Time to handle a message (decode, handler, settle), by outcome.",
            [*group, "outcome"],
            unit="seconds",
            buckets=DURATION_BUCKETS,
            registry=target,
        )
        self.in_flight_gauge = Gauge("msgbroker_messages_in_flight", "Handlers running now.", group, registry=target)
        self.pending_gauge = Gauge(
            "msgbroker_messages_pending",
            "Messages of the topic the group has not settled (last refresh).",
            group,
            registry=target,
        )
        self.breaker_state = Gauge(
            "msgbroker_circuit_breaker_state",
            "1 for the circuit breaker's current state, 0 for the others.",
            ["breaker", "state"],
            registry=target,
        )
        self.breaker_transitions = Counter(
            "msgbroker_circuit_breaker_transitions",
            "Circuit breaker state changes, by the state entered.",
            ["breaker", "state"],
            registry=target,
        )

        # labels() validates and locks on every call: the hot path keeps the labelled children
        self._sent: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._handled: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._in_flight: dict[tuple[str, str, str], Any] = {}

    def published(self, system: str, topic: str, count: int, seconds: float) -> None:
        children = self._sent.get((system, topic))
        if children is None:
            children = self._sent[(system, topic)] = (
                self.sent.labels(system, topic),
                self.send_duration.labels(system, topic, "send"),
            )
        if count:
            children[0].inc(count)
        children[1].observe(seconds)

    def handled(self, system: str, topic: str, group: str, outcome: str, seconds: float) -> None:
        key = (system, topic, group, outcome)
        children = self._handled.get(key)
        if children is None:
            children = self._handled[key] = (self.consumed.labels(*key), self.process_duration.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def in_flight(self, system: str, topic: str, group: str, delta: int) -> None:
        key = (system, topic, group)
        child = self._in_flight.get(key)
        if child is None:
            child = self._in_flight[key] = self.in_flight_gauge.labels(*key)
        child.inc(delta)

    def pending(self, system: str, topic: str, group: str, count: int) -> None:
        self.pending_gauge.labels(system, topic, group).set(count)

    def breaker(self, name: str, state: str, changed: bool) -> None:
        for each in BREAKER_STATES:
            self.breaker_state.labels(name, each).set(1 if each == state else 0)
        if changed:
            self.breaker_transitions.labels(name, state).inc()


# prometheus_client rejects a second instrument of the same name in one registry: one set of
# instruments per registry, shared by every plugin recording into it.
_PROMETHEUS: weakref.WeakKeyDictionary[Any, _Prometheus] = weakref.WeakKeyDictionary()


def _prometheus_for(target: Any) -> _Prometheus:
    backend = _PROMETHEUS.get(target)
    if backend is None:
        backend = _PROMETHEUS[target] = _Prometheus(target)
    return backend


class _OpenTelemetry:
    """The instruments on one OpenTelemetry meter."""

    def __init__(self, meter_provider: Any) -> None:
        from opentelemetry import metrics as otel_metrics

        from . import __version__

        meter = otel_metrics.get_meter("msgbroker", __version__, meter_provider=meter_provider)
        self._observation = otel_metrics.Observation
        self.sent = meter.create_counter(
            "messaging.client.sent.messages",
            unit="{message}",
            description="Messages published and confirmed by the broker.",
        )
        self.send_duration = meter.create_histogram(
            "messaging.client.operation.duration",
            unit="s",
            description="Time to publish a message or batch until confirmed.",
        )
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages", unit="{message}", description="Messages handled, by outcome."
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Time to handle a message (decode, handler, settle), by outcome.",
        )
        self.in_flight_counter = meter.create_up_down_counter(
            "msgbroker.messages.in_flight", unit="{message}", description="Handlers running now."
        )
        self._pending: dict[tuple[str, str, str], int] = {}
        self._breakers: dict[str, str] = {}
        meter.create_observable_gauge(
            "msgbroker.messages.pending",
            callbacks=[self._observe_pending],
            unit="{message}",
            description="Messages of the topic the group has not settled (last refresh).",
        )
        meter.create_observable_gauge(
            "msgbroker.circuit_breaker.state",
            callbacks=[self._observe_breakers],
            description="1 for the circuit breaker's current state, 0 for the others.",
        )
        self.transitions = meter.create_counter(
            "msgbroker.circuit_breaker.transitions", description="Circuit breaker state changes, by the state entered."
        )

    def _observe_pending(self, options: Any) -> Iterable[Any]:
        return [
            self._observation(
                count,
                {
                    "messaging.system": system,
                    "messaging.destination.name": topic,
                    "messaging.consumer.group.name": group,
                },
            )
            for (system, topic, group), count in list(self._pending.items())
        ]

    def _observe_breakers(self, options: Any) -> Iterable[Any]:
        return [
            self._observation(1 if each == state else 0, {"msgbroker.breaker": name, "msgbroker.state": each})
            for name, state in list(self._breakers.items())
            for each in BREAKER_STATES
        ]

    def published(self, system: str, topic: str, count: int, seconds: float) -> None:
        attributes = {"messaging.system": system, "messaging.destination.name": topic}
        if count:
            self.sent.add(count, attributes)
        self.send_duration.record(seconds, {**attributes, "messaging.operation.name": "send"})

    def handled(self, system: str, topic: str, group: str, outcome: str, seconds: float) -> None:
        attributes = {
            "messaging.system": system,
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": group,
            "msgbroker.outcome": outcome,
        }
        self.consumed.add(1, attributes)
        self.process_duration.record(seconds, attributes)

    def in_flight(self, system: str, topic: str, group: str, delta: int) -> None:
        self.in_flight_counter.add(
            delta,
            {"messaging.system": system, "messaging.destination.name": topic, "messaging.consumer.group.name": group},
        )

    def pending(self, system: str, topic: str, group: str, count: int) -> None:
        self._pending[(system, topic, group)] = count

    def breaker(self, name: str, state: str, changed: bool) -> None:
        self._breakers[name] = state
        if changed:
            self.transitions.add(1, {"msgbroker.breaker": name, "msgbroker.state": state})


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class MessagingMetrics:
    """The metrics plugin: records publishes and handling through the hooks, and pending counts
    and circuit breaker states when asked to watch them.

    ``registry`` is the ``prometheus_client`` registry (default: its global ``REGISTRY``);
    ``meter_provider`` the OpenTelemetry one (default: the global one). ``prometheus`` and
    ``otel`` choose the backends; by default each one whose library is installed.
    """

    def __init__(
        self,
        *,
        registry: Any = None,
        meter_provider: Any = None,
        prometheus: bool | None = None,
        otel: bool | None = None,
    ) -> None:
        if prometheus is None:
            prometheus = registry is not None or _importable("prometheus_client")
        if otel is None:
            otel = meter_provider is not None or _importable("opentelemetry.metrics")
        self.backends: list[_Backend] = []
        if prometheus:
            try:
                from prometheus_client import REGISTRY
            except ImportError as exc:
                raise ImportError(
                    "Prometheus metrics need prometheus-client: pip install 'msgbroker[prometheus]'"
                ) from exc
            self.registry = registry if registry is not None else REGISTRY
            self.backends.append(_prometheus_for(self.registry))
        else:
            self.registry = None
        if otel:
            try:
                self.backends.append(_OpenTelemetry(meter_provider))
            except ImportError as exc:
                raise ImportError(
                    "OpenTelemetry metrics need opentelemetry-api: pip install 'msgbroker[otel]'"
                ) from exc
        self._watchers: set[asyncio.Task[None]] = set()
        self._breakers: list[tuple[Any, Any]] = []

    # -- hooks -------------------------------------------------------------------------------

    @hookimpl
    def msgbroker_publish(self, event: PublishEvent) -> AbstractContextManager[object]:
        return self._publishing(event)

    @contextmanager
    def _publishing(self, event: PublishEvent) -> Iterator[None]:
        started = time.perf_counter()
        confirmed = 0
        try:
            yield
            confirmed = len(event.records)
        finally:
            seconds = time.perf_counter() - started
            for backend in self.backends:
                backend.published(event.system, event.topic, confirmed, seconds)

    @hookimpl
    def msgbroker_handle(self, event: HandleEvent) -> AbstractContextManager[object]:
        return self._handling(event)

    @contextmanager
    def _handling(self, event: HandleEvent) -> Iterator[None]:
        for backend in self.backends:
            backend.in_flight(event.system, event.topic, event.group, 1)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            outcome = event.outcome or INTERRUPTED
            for backend in self.backends:
                backend.in_flight(event.system, event.topic, event.group, -1)
                backend.handled(event.system, event.topic, event.group, outcome, seconds)

    # -- pending -----------------------------------------------------------------------------

    async def refresh_pending(self, broker: Broker, lanes: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Ask ``broker`` for ``pending_count`` of each (topic, group) now and record it."""
        counts: dict[tuple[str, str], int] = {}
        for topic, group in lanes:
            count = await broker.pending_count(topic, group)
            counts[(topic, group)] = count
            for backend in self.backends:
                backend.pending(broker.provider, topic, group, count)
        return counts

    def watch_pending(
        self, broker: Broker, lanes: Sequence[tuple[str, str]], interval: float = 15.0
    ) -> asyncio.Task[None]:
        """Refresh the pending gauge of each (topic, group) every ``interval`` seconds, until the
        returned task is cancelled or the broker closes (a failed count is logged and retried)."""

        async def refresh() -> None:
            while broker._state == "open":
                try:
                    await self.refresh_pending(broker, lanes)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("msgbroker.metrics: counting pending messages failed: %s", exc)
                await asyncio.sleep(interval)

        task = asyncio.create_task(refresh(), name="msgbroker-metrics-pending")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return task

    # -- circuit breakers --------------------------------------------------------------------

    def watch_breaker(self, breaker: Any) -> None:
        """Record the state of a :class:`msgbroker.resilience.CircuitBreaker` (or of the breaker
        of a :class:`~msgbroker.resilience.ResilienceService`) and every change of it."""
        target = getattr(breaker, "circuit_breaker", breaker)
        if target is None:
            raise ValueError("this ResilienceService has no circuit breaker (enable_circuit_breaker is off)")

        def changed(change: Any) -> None:
            for backend in self.backends:
                backend.breaker(change.breaker, str(change.state), True)

        target.add_listener(changed)
        self._breakers.append((target, changed))
        for backend in self.backends:
            backend.breaker(target.name, str(target.state), False)

    def close(self) -> None:
        """Stop the pending watchers and breaker listeners."""
        for task in list(self._watchers):
            task.cancel()
        for target, listener in self._breakers:
            with contextlib.suppress(ValueError):
                target.remove_listener(listener)
        self._breakers.clear()


def instrument(
    *,
    registry: Any = None,
    meter_provider: Any = None,
    prometheus: bool | None = None,
    otel: bool | None = None,
) -> MessagingMetrics:
    """Record metrics of every publish and handling from now on (brokers and subscriptions
    opened after this call); returns the plugin. Calling it again replaces the earlier one."""
    uninstrument()
    plugin = MessagingMetrics(registry=registry, meter_provider=meter_provider, prometheus=prometheus, otel=otel)
    _plugins.register(plugin, name=PLUGIN_NAME)
    return plugin


def uninstrument() -> None:
    """Stop recording (brokers and subscriptions opened after this call)."""
    plugins = _plugins.plugins
    plugin = plugins.get_plugin(PLUGIN_NAME)
    if plugin is not None:
        plugins.unregister(name=PLUGIN_NAME)
        if isinstance(plugin, MessagingMetrics):
            plugin.close()


def exposition(registry: Any = None) -> str:
    """The Prometheus text exposition of ``registry`` (default: the global one) — what a
    Prometheus server would scrape."""
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(registry if registry is not None else REGISTRY).decode()
