"""``msgbroker metrics``: broker health and pending counts as Prometheus text or JSON, once or
served over HTTP."""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import typer

from .._broker import Broker
from .._errors import MsgBrokerError
from ._errors import CliError, require_prometheus
from ._options import ConfigOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, err
from ._target import Target, run_with_broker


def metrics_command(
    topic: Annotated[str | None, typer.Argument(help="Topic whose pending count to include.")] = None,
    groups: Annotated[list[str] | None, typer.Option("--group", "-g", help="Consumer group (repeatable).")] = None,
    serve: Annotated[
        int | None, typer.Option("--serve", help="Serve /metrics on this port (127.0.0.1) until Ctrl-C.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes with --serve.")
    ] = 15.0,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Broker health and pending counts as Prometheus text (or JSON), once or served over HTTP.

    Grafana-free: pipe it to a file for node_exporter's textfile collector, or curl --serve.
    """
    require_prometheus()
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from ..metrics import MessagingMetrics, exposition

    if groups and topic is None:
        raise CliError("give the TOPIC whose groups' pending counts to show", exit_code=2)
    lanes = [(topic, g) for g in (groups or [])] if topic is not None else []
    target_registry = CollectorRegistry()
    recorder = MessagingMetrics(registry=target_registry, prometheus=True, otel=False)
    up = Gauge("msgbroker_up", "1 when the broker answers.", ["messaging_system"], registry=target_registry)

    async def refresh(broker: Broker) -> dict[str, Any]:
        healthy = await broker.is_healthy()
        up.labels(broker.provider).set(1 if healthy else 0)
        counts = await recorder.refresh_pending(broker, lanes) if healthy else {}
        return {
            "healthy": healthy,
            "provider": broker.provider,
            "pending": [{"topic": t, "group": g, "pending": n} for (t, g), n in counts.items()],
        }

    async def work(broker: Broker) -> dict[str, Any]:
        if serve is None:
            return await refresh(broker)
        async def refresh_or_say() -> None:
            try:
                await refresh(broker)
            except MsgBrokerError as exc:
                err().print(f"refresh failed: {exc}", markup=False)

        # The first refresh before the server starts: a scrape never sees msgbroker_up without a value.
        await refresh_or_say()
        server, thread = start_http_server(serve, addr="127.0.0.1", registry=target_registry)
        err().print(f"serving http://127.0.0.1:{server.server_port}/metrics (Ctrl-C to stop)", markup=False)
        try:
            while True:
                await asyncio.sleep(interval)
                await refresh_or_say()
        finally:
            server.shutdown()
            thread.join(5)

    state = run_with_broker(Target(url, config, partition_count), work)
    if json_output:
        emit_json(state)
    else:
        sys.stdout.write(exposition(target_registry))
    return 0 if state["healthy"] else 1


def register(app: typer.Typer) -> None:
    """Add ``metrics`` to ``app``."""
    app.command("metrics")(metrics_command)
