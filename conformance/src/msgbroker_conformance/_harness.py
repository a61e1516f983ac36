"""The harness: what a provider's test setup tells the suite (where the server is, how to
isolate one test, how slow the server may be, which fault hooks exist)."""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar
from urllib.parse import urlsplit

import msgbroker
from msgbroker import Capabilities, Transport

__all__ = ["FAULT_HOOKS", "ConformanceHarness", "OptionHarness", "load_harness"]

FAULT_HOOKS: tuple[str, ...] = ("restart_server",)
"""Optional coroutine methods a harness may define; a case that needs an absent one is skipped
naming it."""


class ConformanceHarness:
    """Subclass this in your provider's ``tests/test_conformance.py`` and set :attr:`url`.

    ``url`` of ``None`` makes every case FAIL (never skip) with a message naming
    :attr:`url_env`, so a missing server can never pass silently. Optional fault hooks are
    coroutine methods; today the suite knows ``async def restart_server(self) -> None``
    (restart the broker server and return once it accepts connections again).
    """

    url: ClassVar[str | None] = None
    """The connection URL; its scheme picks the provider (``redis://``, ``memory://``...)."""
    provider: ClassVar[str | None] = None
    """Pick the provider by name instead (settings then come from the environment)."""
    url_env: ClassVar[str | None] = None
    """The environment variable the URL comes from, named when it is missing."""
    timeout_multiplier: ClassVar[float] = 1.0
    """Slack for slow servers: every bounded wait of the suite is multiplied by it."""
    dedup_window: ClassVar[float] = 1.0
    """The ``deduplication_window`` (seconds) the dedup case uses; raise it if your broker's
    window has a coarser granularity."""
    local: ClassVar[bool] = False
    """True for in-process providers: the state machine then runs its larger budgets."""
    volume: ClassVar[int] = 300
    """Messages the volume tier publishes (``MSGBROKER_CONFORMANCE_VOLUME`` overrides it): small
    for an everyday run, thousands for a nightly one (a 1-in-1,000 loss is caught in every run
    from about 6,000)."""

    def volume_size(self) -> int:
        """The volume tier's size: ``MSGBROKER_CONFORMANCE_VOLUME`` if set, else :attr:`volume`."""
        env = os.environ.get("MSGBROKER_CONFORMANCE_VOLUME")
        return int(env) if env else int(self.volume)

    def overrides(self, namespace: str) -> dict[str, Any]:
        """Settings that isolate one test (a key/stream/exchange prefix containing ``namespace``)
        and make failover fast (a short ``claim_timeout`` / ``ack_wait``)."""
        return {}

    # -- used by the suite --------------------------------------------------------------------

    def describe(self) -> str:
        """A short name for messages: the harness class and its URL or provider."""
        return f"{type(self).__name__}({self.url or self.provider or 'no url'})"

    def hooks(self) -> list[str]:
        """The fault hooks this harness supplies."""
        return [name for name in FAULT_HOOKS if callable(getattr(self, name, None))]

    def missing_target(self) -> str | None:
        """Why the suite cannot reach a server, or None when a URL or provider is set."""
        if self.url or self.provider:
            return None
        where = f"the environment variable {self.url_env}" if self.url_env else f"{type(self).__name__}.url"
        return (
            f"{where} is not set, so the suite has no server to test: start the broker "
            "(in this repository: scripts/brokers up, then source .brokers/env) or pass --msgbroker-url"
        )

    def connect(self, namespace: str, **settings: Any) -> msgbroker.Broker:
        """An unopened broker for ``namespace`` with ``settings`` on top of :meth:`overrides`."""
        merged = merge_settings(self.overrides(namespace), settings)
        if self.url:
            broker = msgbroker.connect(self.url, **merged)
            if self.provider and broker.provider != self.provider:
                raise AssertionError(
                    f"{self.url!r} selects the {broker.provider!r} provider, not {self.provider!r}"
                )
            return broker
        return msgbroker.connect(None, provider=self.provider, **merged)

    def transport_class(self) -> type[Transport]:
        """The provider's Transport class, found by URL scheme or name without building it."""
        if self.url:
            scheme = urlsplit(self.url).scheme if "://" in self.url else ""
            if not scheme:
                raise msgbroker.ConfigurationError(f"connection URL {self.url!r} has no scheme")
            return msgbroker.registry.by_scheme(scheme)
        return msgbroker.registry.by_name(str(self.provider))

    def capabilities(self) -> Capabilities:
        """The provider's declaration for the server under test, read without a broker
        connection (``Transport.capabilities_for_url``: ``CAPABILITIES``, narrowed by a provider
        whose server version lacks something)."""
        transport = self.transport_class()
        return transport.capabilities_for_url(self.url) if self.url else transport.CAPABILITIES

    def provider_name(self) -> str:
        """The provider's name (``Transport.NAME``)."""
        return self.transport_class().NAME


def merge_settings(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, merging nested sections (``redis={...}``) key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


# Isolation and fast failover for the providers of this repository when the suite is run
# with only --msgbroker-url/--msgbroker-provider (a provider's own harness says better).
_KNOWN_OVERRIDES: dict[str, Any] = {
    "memory": lambda ns: {"memory": {"name": f"conformance-{ns}", "claim_timeout": 0.5}},
    "redis": lambda ns: {"redis": {"key_prefix": f"conformance-{ns}", "claim_timeout": 2}},
    "nats": lambda ns: {"nats": {"stream_prefix": f"CONF{ns.upper()}", "ack_wait": 2}},
    "rabbitmq": lambda ns: {"rabbitmq": {"exchange_prefix": f"conformance-{ns}"}},
    "kafka": lambda ns: {"kafka": {"client_id": f"conformance-{ns}"}},
}


class OptionHarness(ConformanceHarness):
    """The harness behind ``pytest --pyargs msgbroker_conformance --msgbroker-url=...``: isolation
    settings for the providers of this repository, nothing for others (topics are unique anyway)."""

    def overrides(self, namespace: str) -> dict[str, Any]:
        if not (self.url or self.provider):
            return {}
        try:
            name = self.provider_name()
        except msgbroker.MsgBrokerError:
            return {}
        factory = _KNOWN_OVERRIDES.get(name)
        return dict(factory(namespace)) if factory else {}

    @classmethod
    def for_options(cls, url: str | None, provider: str | None, timeout_multiplier: float) -> OptionHarness:
        """A harness for command-line options (a subclass, since the fields are class-level)."""
        local = False
        if url or provider:
            probe = type("Probe", (ConformanceHarness,), {"url": url, "provider": provider})()
            try:
                local = probe.provider_name() == "memory"
            except msgbroker.MsgBrokerError:
                local = False
        attrs = {"url": url, "provider": provider, "timeout_multiplier": timeout_multiplier, "local": local,
                 "url_env": None}
        return type("OptionHarness", (cls,), attrs)()  # type: ignore[no-any-return]


def load_harness(spec: str) -> ConformanceHarness:
    """``package.module:HarnessClass`` -> an instance (for ``--msgbroker-harness``)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--msgbroker-harness wants 'package.module:HarnessClass', got {spec!r}")
    target = getattr(importlib.import_module(module_name), attr)
    harness = target() if isinstance(target, type) else target
    if not isinstance(harness, ConformanceHarness):
        raise TypeError(f"{spec!r} is not a msgbroker_conformance.ConformanceHarness")
    return harness
