"""TLS against a real TLS listener of every provider (issue 12).

``scripts/brokers up`` gives each server a TLS port with a certificate from a throw-away test
CA (``.brokers/tls/``) and writes its address to ``.brokers/env``::

    MSGBROKER_TEST_REDIS_TLS_URL=rediss://127.0.0.1:6390
    MSGBROKER_TEST_NATS_TLS_URL=tls://127.0.0.1:4232
    MSGBROKER_TEST_RABBITMQ_TLS_URL=amqps://guest:guest@127.0.0.1:5671/
    MSGBROKER_TEST_KAFKA_TLS_BOOTSTRAP_SERVERS=127.0.0.1:9192
    MSGBROKER_TEST_TLS_CA_FILE=/path/to/.brokers/tls/ca.pem

Through the public API only: trusting the test CA (``<provider>.ssl_cafile``), messages go
through in order; trusting only the system's CAs, the connection is refused with a
:class:`ConfigurationError` that says what to set, which shows the port really speaks TLS.
A missing variable is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgbroker
import pytest
from msgbroker import ConfigurationError, Message, MessageContext, MsgBrokerError
from msgbroker.testing import eventually

CA_VARIABLE = "MSGBROKER_TEST_TLS_CA_FILE"
HOW = ("run `scripts/brokers up` and load .brokers/env (`set -a; . .brokers/env; set +a`; scripts/test does "
       "both), or set it to a TLS server of your own")
SECRET = "s3cr3t-Tl5-Pa55"

# provider -> (variable with its TLS address, URL template)
TLS_ENDPOINTS: dict[str, tuple[str, str]] = {
    "redis": ("MSGBROKER_TEST_REDIS_TLS_URL", "{}"),
    "nats": ("MSGBROKER_TEST_NATS_TLS_URL", "{}"),
    "rabbitmq": ("MSGBROKER_TEST_RABBITMQ_TLS_URL", "{}"),
    "kafka": ("MSGBROKER_TEST_KAFKA_TLS_BOOTSTRAP_SERVERS", "kafka://{}"),
}


class TlsMessage(Message):
    key: str
    seq: int

    @property
    def partition_key(self) -> str:
        return self.key


def setting(variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        pytest.fail(f"{variable} is not set: {HOW}", pytrace=False)
    return value


def tls_url(provider: str) -> str:
    variable, template = TLS_ENDPOINTS[provider]
    return template.format(setting(variable))


def ca_file() -> str:
    path = setting(CA_VARIABLE)
    if not Path(path).is_file():
        pytest.fail(f"{CA_VARIABLE}={path!r} is not a file: {HOW}", pytrace=False)
    return path


def settings_for(provider: str, token: str, cafile: str | None) -> dict[str, Any]:
    """Settings with names of this test only; ``ssl_cafile`` when ``cafile`` is given."""
    sections: dict[str, dict[str, Any]] = {
        "redis": {"key_prefix": f"tls-{token}"},
        "nats": {"stream_prefix": f"TLS{token}"},
        "rabbitmq": {"exchange_prefix": f"tls-{token}", "queue_expires": 60},
        "kafka": {"security_protocol": "SSL"},
    }
    section = sections[provider]
    if cafile is not None:
        section["ssl_cafile"] = cafile
    return {"partition_count": 4, "retry_delay": 0.05, provider: section}


def _installed(name: str) -> bool:
    try:
        msgbroker.registry.by_name(name)
    except msgbroker.ProviderNotFoundError:
        return False
    return True


def _providers() -> list[Any]:
    # A provider that is installed must pass; its TLS server missing fails in tls_url.
    return [pytest.param(name, id=name) for name in TLS_ENDPOINTS if _installed(name)]


async def _drop(broker: msgbroker.Broker, provider: str, topic: str, group: str, token: str) -> None:
    """Remove what the test left on the server (best effort: a failure here is not the test's)."""
    transport: Any = broker.transport
    with contextlib.suppress(Exception):
        async with asyncio.timeout(30):
            if provider == "rabbitmq":
                await transport.delete_topic(topic, [group])
            elif provider == "kafka":
                await transport.admin.delete_topics([topic, f"{topic}.dlq"])
            elif provider == "redis":
                async for key in transport.redis.scan_iter(match=f"tls-{token}*"):
                    await transport.redis.delete(key)
            elif provider == "nats":
                for info in await transport.jsm.streams_info():
                    name = info.config.name
                    if name.startswith((f"TLS{token}_", f"KV_TLS{token}_")):
                        await transport.jsm.delete_stream(name)


@pytest.mark.parametrize("provider", _providers())
async def test_messages_arrive_in_order_over_tls_with_the_test_ca(provider: str) -> None:
    url, cafile, token = tls_url(provider), ca_file(), uuid.uuid4().hex[:8]
    topic, group = f"tls-{token}", "tls-readers"
    handled: list[int] = []

    async def handle(ctx: MessageContext[TlsMessage]) -> None:
        handled.append(ctx.message.seq)

    async with asyncio.timeout(120):
        async with msgbroker.connect(url, **settings_for(provider, token, cafile)) as broker:
            assert await broker.is_healthy()
            try:
                await broker.subscribe(topic, group, handle, message_type=TlsMessage)
                for seq in range(10):
                    await broker.publish(topic, TlsMessage(key="one-key", seq=seq))
                await eventually(lambda: len(set(handled)) == 10, timeout=90, interval=0.05,
                                 what=f"the 10 messages handled over TLS ({provider})")
                assert list(dict.fromkeys(handled)) == list(range(10)), f"{provider}: out of order: {handled}"
                assert await broker.pending_count(topic, group) == 0
            finally:
                await broker.consumer.close()
                await _drop(broker, provider, topic, group, token)


@pytest.mark.parametrize("provider", _providers())
async def test_tls_without_trusting_the_test_ca_is_refused_with_a_configuration_error(provider: str) -> None:
    url = tls_url(provider)
    broker = msgbroker.connect(url, **settings_for(provider, uuid.uuid4().hex[:8], None))
    async with asyncio.timeout(60):  # refused, not hanging
        with pytest.raises(ConfigurationError) as info:
            await broker.open()
    text = str(info.value)
    assert "does not trust" in text, text
    assert f"{provider}.ssl_cafile" in text, text
    assert not await broker.is_healthy()
    await broker.close()


@pytest.mark.parametrize("provider", _providers())
async def test_an_unreadable_ca_file_is_named_in_a_configuration_error(provider: str, tmp_path: Path) -> None:
    url = tls_url(provider)
    missing = str(tmp_path / "no-such-ca.pem")
    broker = msgbroker.connect(url, **settings_for(provider, uuid.uuid4().hex[:8], missing))
    async with asyncio.timeout(30):
        with pytest.raises(ConfigurationError) as info:
            await broker.open()
    assert f"{provider}.ssl_cafile={missing!r}" in str(info.value)
    assert "No such file" in str(info.value)


def _with_password(provider: str, url: str) -> tuple[str, dict[str, Any]]:
    """The TLS url with SECRET as its password (Kafka: a SASL password), and extra settings."""
    if provider == "kafka":
        return url, {"kafka": {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                               "sasl_username": "u", "sasl_password": SECRET}}
    parts = urlsplit(url)
    user = parts.username or "user"
    netloc = f"{user}:{SECRET}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), {}


@pytest.mark.parametrize("provider", _providers())
async def test_a_password_sent_over_tls_is_in_no_error_and_no_log(provider: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url, extra = _with_password(provider, tls_url(provider))
    settings = settings_for(provider, uuid.uuid4().hex[:8], ca_file())
    for key, value in extra.items():
        settings[key] = {**settings[key], **value}
    broker = msgbroker.connect(url, **settings)
    if provider == "kafka":  # a separate field, kept out of repr (a url's password is not: see test_secrets)
        assert SECRET not in repr(broker.settings)
    shown = ""
    try:
        async with asyncio.timeout(60):
            await broker.open()  # nats-server without accounts ignores the password: then it connects
            await broker.is_healthy()
    except (MsgBrokerError, OSError) as exc:
        shown = f"{exc!s} {exc!r} {exc.__cause__!s} {exc.__cause__!r}"
    finally:
        await broker.close()
    assert SECRET not in shown
    assert SECRET not in caplog.text
