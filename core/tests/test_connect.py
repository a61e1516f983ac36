"""connect(): provider selection by URL scheme or settings, and clear errors."""

from __future__ import annotations

import msgbroker
import pytest
from msgbroker import BrokerClosedError, ConfigurationError, ProviderNotFoundError
from msgbroker._registry import ProviderRegistry


def test_an_unknown_scheme_lists_the_known_schemes() -> None:
    with pytest.raises(ProviderNotFoundError) as info:
        msgbroker.connect("nosuch://x")
    text = str(info.value)
    assert "'nosuch://'" in text
    for scheme in ("memory://", "redis://", "nats://", "amqp://", "kafka://"):
        assert scheme in text


def test_a_provider_that_is_not_installed_names_the_pip_install() -> None:
    bare = ProviderRegistry()
    bare._entry_points_loaded = True  # as on a machine with only the core installed
    for scheme, extra in [("redis", "redis"), ("rediss", "redis"), ("nats", "nats"), ("amqp", "rabbitmq"),
                          ("kafka", "kafka")]:
        with pytest.raises(ProviderNotFoundError, match=rf"pip install 'msgbroker\[{extra}\]'"):
            bare.by_scheme(scheme)


def test_a_url_without_a_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no scheme"):
        msgbroker.connect("localhost:6379")


def test_settings_select_the_provider_and_overrides_apply() -> None:
    broker = msgbroker.connect(msgbroker.BrokerSettings(partition_count=8), batch_size=5)
    assert broker.provider == "memory"
    assert (broker.settings.partition_count, broker.settings.batch_size) == (8, 5)


def test_nested_overrides_merge_into_a_section() -> None:
    broker = msgbroker.connect("memory://x", memory={"claim_timeout": 2})
    assert broker.settings.memory.name == "x"
    assert broker.settings.memory.claim_timeout.total_seconds() == 2


def test_a_bad_override_names_the_value() -> None:
    with pytest.raises(ConfigurationError, match="partition_count=-1"):
        msgbroker.connect("memory://", partition_count=-1)


async def test_a_closed_broker_refuses_work_and_reports_unhealthy() -> None:
    broker = await msgbroker.connect("memory://")
    assert await broker.is_healthy()
    await broker.close()
    assert not await broker.is_healthy()
    with pytest.raises(BrokerClosedError):
        await broker.pending_count("t", "g")


async def test_third_party_providers_register_through_the_same_hook() -> None:
    from msgbroker._memory import MemoryTransport

    class EchoTransport(MemoryTransport):
        NAME = "echo"
        SCHEMES = ("echo",)

    class Plugin:
        @msgbroker.hookimpl
        def msgbroker_providers(self) -> list[type[msgbroker.Transport]]:
            return [EchoTransport]

    registry = ProviderRegistry()
    registry.register(Plugin(), name="echo-plugin")
    assert registry.by_scheme("echo") is EchoTransport
    assert "echo" in registry.names()


def test_two_providers_with_one_name_are_refused() -> None:
    from msgbroker._memory import MemoryTransport

    class Impostor(MemoryTransport):
        NAME = "memory"

    class Plugin:
        @msgbroker.hookimpl
        def msgbroker_providers(self) -> list[type[msgbroker.Transport]]:
            return [Impostor]

    registry = ProviderRegistry()
    with pytest.raises(ConfigurationError, match="two providers are named 'memory'"):
        registry.register(Plugin(), name="impostor")


def test_a_mistyped_hook_is_a_loud_error() -> None:
    import pluggy

    class Plugin:
        @msgbroker.hookimpl
        def msgbroker_provider(self) -> list[object]:  # sic: not a hook we define
            return []

    registry = ProviderRegistry()
    with pytest.raises(pluggy.PluginValidationError):
        registry.register(Plugin(), name="typo")
