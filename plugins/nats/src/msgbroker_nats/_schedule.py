"""Scheduled messages on NATS (semantics rule 14; docs/providers/nats.md, "Scheduled messages"):
the server's own message schedules (nats-server 2.12 and later, ADR-51).

A scheduled message is stored in its topic's stream on a schedule subject of its own,
``<prefix>.<topic>.~s.<digest of the message id>`` (``~`` cannot be in a topic name, so no topic's
partition subjects meet it), with the headers ``Nats-Schedule: @at <time>`` and
``Nats-Schedule-Target: <prefix>.<topic>.<partition>``; the stream gets ``allow_msg_schedules`` and
the schedule subjects on the first schedule. At its time the server publishes the message — its
body and headers, so the msgbroker envelope with the message id and key — to the partition's
subject in the same stream and removes the schedule: no client takes part, and it survives
restarts of the server (the stream is file-backed) and of every client. A cancel deletes the
schedule message.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import nats.js.errors
from msgbroker.spi import Capabilities, ConfigurationError

__all__ = [
    "SCHEDULES_SINCE",
    "ScheduleTransport",
    "at_header",
    "capabilities_for",
    "schedule_subject",
    "schedule_subjects",
    "server_version",
]

SCHEDULES_SINCE = (2, 12)
"""The first nats-server version with message schedules."""
SCHEDULE_HEADER = "Nats-Schedule"
TARGET_HEADER = "Nats-Schedule-Target"
_NO_MESSAGE = 10037
"""JetStream's err_code for a message that is not there (any more)."""


def capabilities_for(declared: Capabilities, version: str | None) -> Capabilities:
    """The provider's declaration for a server of ``version`` ("2.9.10"): without message
    schedules (before 2.12), scheduling is missing, naming the version."""
    if version is None or _parse(version) >= SCHEDULES_SINCE:
        return declared
    reasons = dict(declared.reasons)
    reasons["scheduling"] = (
        f"nats-server {version} has no message schedules (they came with nats-server 2.12, ADR-51); the provider "
        "uses the server's own, so scheduling needs a 2.12 or later server")
    return replace(declared, scheduling="none", reasons=reasons)


@functools.lru_cache(maxsize=16)
def server_version(url: str | None) -> str | None:
    """The version a nats-server at ``url`` (its first server) announces in the INFO line it sends
    on connect, read without a client (for a declaration before connecting: the conformance
    harness); None when it cannot be read."""
    if not url:
        return None
    parts = urlsplit(url.split(",")[0].strip())
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=3) as sock:
            line = sock.recv(8192).decode("utf-8", "replace")
    except OSError:
        return None
    if not line.startswith("INFO "):
        return None
    try:
        version = json.loads(line[5:].strip()).get("version")
    except ValueError:
        return None
    return str(version) if version else None


def _parse(version: str) -> tuple[int, int]:
    parts = version.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def schedule_subjects(prefix: str, topic: str) -> str:
    """The stream subjects of a topic's schedules."""
    return f"{prefix}.{topic}.~s.*"


def schedule_subject(prefix: str, topic: str, message_id: str) -> str:
    """The schedule subject of one message: one subject per message id (a second schedule of the
    id replaces the first: the server keeps one schedule per subject)."""
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{prefix}.{topic}.~s.{digest}"


def at_header(deliver_at: float) -> str:
    """``@at <RFC 3339 UTC>`` with microseconds (the server parses fractions of a second)."""
    return "@at " + datetime.fromtimestamp(deliver_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ScheduleTransport(Protocol):
    """What the scheduling needs of the NATS transport."""

    @property
    def jsm(self) -> Any: ...

    @property
    def js(self) -> Any: ...


async def enable(transport: ScheduleTransport, stream: str, subjects: str) -> None:
    """Give ``stream`` message schedules and the topic's schedule subjects (once per stream:
    later calls find them there)."""
    info = await transport.jsm.stream_info(stream)
    config = info.config
    present = list(config.subjects or [])
    if config.allow_msg_schedules and subjects in present:
        return
    await transport.jsm.update_stream(config.evolve(allow_msg_schedules=True, subjects=[*present, subjects]
                                                    if subjects not in present else present))


async def publish(transport: ScheduleTransport, subject: str, body: bytes, headers: Mapping[str, str]) -> None:
    """Store the schedule message (confirmed by the stream)."""
    ack = await transport.js.publish(subject, body, headers=dict(headers))
    if ack is None or not getattr(ack, "stream", None):
        raise ConfigurationError(f"nats: no stream confirmed the schedule on {subject!r}")


async def cancel(transport: ScheduleTransport, stream: str, subject: str) -> bool:
    """Delete the schedule message of ``subject``: True when it was there."""
    jsm = transport.jsm
    try:
        message = await jsm.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return False
    try:
        return bool(await jsm.delete_msg(stream, message.seq))
    except nats.js.errors.NotFoundError:
        return False
    except nats.js.errors.APIError as exc:
        if exc.err_code == _NO_MESSAGE or exc.code == 404:  # the server fired it meanwhile
            return False
        raise
