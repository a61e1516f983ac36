"""Which broker a command talks to (``--url``, ``--config``, the ``MSGBROKER_*`` environment), and
opening and closing it within bounds."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .._broker import Broker, connect
from .._errors import MsgBrokerError
from .._registry import registry
from .._settings import BrokerSettings
from ._errors import CliError
from ._loop import run_async
from ._render import err

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """Where to connect: the command's ``--url``, ``--config`` and ``--partition-count``."""

    url: str | None = None
    config: Path | None = None
    partition_count: int | None = None

    def broker(self) -> Broker:
        """An unopened broker for these options (URL over environment over file)."""
        overrides: dict[str, Any] = {}
        if self.partition_count is not None:
            overrides["partition_count"] = self.partition_count
        if self.config is not None:
            settings = BrokerSettings.from_file(self.config)
            if self.url is None:
                return connect(settings, **overrides)
            scheme = urlsplit(self.url).scheme if "://" in self.url else ""
            if not scheme:
                raise CliError(f"connection URL {self.url!r} has no scheme (like redis:// or memory://)")
            transport = registry.by_scheme(scheme)
            from_url = {"provider": transport.NAME, **transport.settings_from_url(self.url)}
            return connect(BrokerSettings(**_merge(_merge(settings.model_dump(), from_url), overrides)))
        if self.url is not None:
            return connect(self.url, **overrides)
        if "MSGBROKER_PROVIDER" in os.environ:
            return connect(None, **overrides)
        raise CliError(
            "no broker given: pass --url (or set MSGBROKER_URL), --config FILE, or MSGBROKER_PROVIDER "
            "with its MSGBROKER_<PROVIDER>__* settings"
        )


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        current = out.get(key)
        out[key] = _merge(current, value) if isinstance(value, Mapping) and isinstance(current, Mapping) else value
    return out


def describe(broker: Broker) -> str:
    """Where ``broker`` points, without credentials."""
    settings = broker.settings
    name = broker.provider
    if name == "memory":
        return f"memory://{settings.memory.name}"
    if name == "kafka":
        return f"kafka://{settings.kafka.bootstrap_servers}"
    section = getattr(settings, name, None)
    url = getattr(section, "url", None)
    if not isinstance(url, str):
        return name
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _connect_timeout() -> float:
    raw = os.environ.get("MSGBROKER_CONNECT_TIMEOUT", "10")
    try:
        return float(raw)
    except ValueError:
        raise CliError(f"MSGBROKER_CONNECT_TIMEOUT={raw!r} is not a number of seconds") from None


async def open_broker(target: Target) -> Broker:
    """Connect, bounded by ``MSGBROKER_CONNECT_TIMEOUT`` seconds (10)."""
    broker = target.broker()
    timeout = _connect_timeout()
    try:
        await asyncio.wait_for(broker.open(), timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await broker.abort()
        raise CliError(f"cannot reach the {broker.provider} broker at {describe(broker)} within {timeout:g}s") from None
    except MsgBrokerError as exc:
        raise CliError(str(exc)) from exc  # the providers' messages name the server
    except OSError as exc:
        raise CliError(f"cannot connect to the {broker.provider} broker at {describe(broker)}: {exc}") from exc
    return broker


async def close_bounded(broker: Broker) -> None:
    """Close gracefully, but give up (and drop the connection) when a sick server makes it hang."""
    grace = broker.settings.shutdown_timeout.total_seconds() + 10
    try:
        await asyncio.wait_for(broker.close(), grace)
    except TimeoutError:
        err().print(f"closing the {broker.provider} connection took over {grace:g}s; dropped it", markup=False)
        with contextlib.suppress(Exception):
            await broker.abort()


def run_with_broker(target: Target, work: Callable[[Broker], Awaitable[T]]) -> T:
    """Open the broker, run ``work`` on one event loop (``run_async``), close the broker."""

    async def session() -> T:
        broker = await open_broker(target)
        try:
            return await work(broker)
        finally:
            await close_bounded(broker)

    return run_async(session())
