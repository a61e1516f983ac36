"""Credentials never appear in errors or logs (issue 12, security settings)."""

from __future__ import annotations

import logging

import msgbroker
import pytest
from msgbroker import ConfigurationError, MsgBrokerError

SECRET = "s3cr3t-Pa55"

# A closed loopback port: every provider fails to connect, and must say so without the password.
UNREACHABLE = [
    ("redis", f"redis://user:{SECRET}@127.0.0.1:1/0"),
    ("redis", f"rediss://user:{SECRET}@127.0.0.1:1/0"),
    ("nats", f"nats://user:{SECRET}@127.0.0.1:1"),
    ("rabbitmq", f"amqp://user:{SECRET}@127.0.0.1:1/"),
]


def _installed(name: str) -> bool:
    try:
        msgbroker.registry.by_name(name)
    except msgbroker.ProviderNotFoundError:
        return False
    return True


@pytest.mark.parametrize(("provider", "url"), [pytest.param(p, u, id=u.split(":")[0]) for p, u in UNREACHABLE
                                               if _installed(p)])
async def test_a_failed_connection_names_no_password(provider: str, url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = msgbroker.connect(url, nats={"url": url} if provider == "nats" else {})
    with pytest.raises((MsgBrokerError, OSError)) as info:
        await broker.open()
    text = f"{info.value!s} {info.value!r} {info.value.__cause__!s}"
    assert SECRET not in text
    assert SECRET not in caplog.text
    assert not await broker.is_healthy()


async def test_kafka_sasl_password_is_not_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    if not _installed("kafka"):
        pytest.fail("the kafka provider is not installed (scripts/bootstrap installs plugins/kafka)")
    caplog.set_level(logging.DEBUG)
    broker = msgbroker.connect("kafka://127.0.0.1:1", kafka={"security_protocol": "SASL_PLAINTEXT",
                                                             "sasl_mechanism": "PLAIN", "sasl_username": "u",
                                                             "sasl_password": SECRET})
    assert SECRET not in repr(broker.settings)
    with pytest.raises((MsgBrokerError, OSError)) as info:
        await broker.open()
    assert SECRET not in f"{info.value!s} {info.value!r}"
    assert SECRET not in caplog.text


def test_a_bad_setting_next_to_a_password_does_not_print_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        msgbroker.connect(f"redis://u:{SECRET}@localhost:6379", partition_count="many")
    assert "partition_count='many'" in str(info.value)
    assert SECRET not in str(info.value)


def test_a_bad_url_setting_is_reported_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        msgbroker.BrokerSettings(redis={"url": f"redis://u:{SECRET}@h:6379", "max_stream_length": 0})
    assert SECRET not in str(info.value)
    assert "max_stream_length=0" in str(info.value)


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ("nats://user:pw@h:4222", "nats://user:***@h:4222"),
        ("cannot reach amqp://guest:guest@127.0.0.1:5672/ now", "cannot reach amqp://guest:***@127.0.0.1:5672/ now"),
        ("rediss://:only-secret@h:6380/0", "rediss://:***@h:6380/0"),
        ("h:6379,password=abc,ssl=true", "h:6379,password=***,ssl=true"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_masks_passwords_in_urls_and_pairs(text: str, safe: str) -> None:
    assert msgbroker.redact(text) == safe
