"""The HTTP endpoint of ``msgbroker run --http PORT``: ``/health`` for probes and ``/metrics`` for
Prometheus, served by each worker process on the worker's event loop (no extra thread)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from .._service import Service

log = logging.getLogger("msgbroker")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 501: "Not Implemented",
            503: "Service Unavailable"}


class Probe:
    """Answers ``GET /health`` (200 when the service runs and its broker answers, else 503, with a
    JSON body) and ``GET /metrics`` (the worker's Prometheus metrics, pending counts refreshed on
    each scrape; 501 without prometheus-client)."""

    def __init__(self, service: Service, worker: int) -> None:
        self.service = service
        self.worker = worker
        self.draining = False
        self.metrics: Any = None
        self.registry: Any = None
        try:
            from prometheus_client import CollectorRegistry

            from ..metrics import instrument
        except ImportError:
            return
        self.registry = CollectorRegistry()
        self.metrics = instrument(registry=self.registry, prometheus=True, otel=False)

    async def health(self) -> tuple[int, dict[str, Any]]:
        service = self.service
        body: dict[str, Any] = {"worker": self.worker, "running": service.running, "draining": self.draining}
        healthy = False
        if service.running and not self.draining:
            broker = service.broker
            healthy = await broker.is_healthy()
            body["provider"] = broker.provider
            body["subscriptions"] = [
                {"topic": s.topic, "group": s.group, "member_id": s.member_id, "partitions": s.partitions}
                for s in service.subscriptions
            ]
        body["healthy"] = healthy
        return (200 if healthy else 503), body

    async def scrape(self) -> tuple[int, str]:
        if self.metrics is None:
            return 501, "metrics need prometheus-client: pip install 'msgbroker[prometheus]'\n"
        from ..metrics import exposition

        if self.service.running:
            lanes = sorted({(s.topic, s.group) for s in self.service.subscribers})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.metrics.refresh_pending(self.service.broker, lanes), 5)
        return 200, exposition(self.registry)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers: not needed
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            content_type = "text/plain; version=0.0.4; charset=utf-8"
            if method not in ("GET", "HEAD"):
                status, text = 405, "GET only\n"
            elif path in ("/health", "/healthz", "/"):
                status, body = await self.health()
                text, content_type = json.dumps(body) + "\n", "application/json"
            elif path == "/metrics":
                status, text = await self.scrape()
            else:
                status, text = 404, "GET /health or /metrics\n"
            data = text.encode()
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head + (b"" if method == "HEAD" else data))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._answer, host, port)

    def close(self) -> None:
        if self.metrics is not None:
            from ..metrics import uninstrument

            uninstrument()
