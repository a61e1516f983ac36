"""The Redis provider's own settings section."""

from __future__ import annotations

import pytest
from msgbroker import BrokerSettings, ConfigurationError
from msgbroker_redis import RedisSettings
from msgbroker_redis._settings import stackexchange_to_url


@pytest.mark.parametrize(
    ("conn", "url"),
    [
        ("localhost:6379", "redis://localhost:6379"),
        ("cache.local", "redis://cache.local:6379"),
        ("h:6380,password=s3cr:t,ssl=true,abortConnect=false", "rediss://:s3cr%3At@h:6380"),
        ("h:6379,defaultDatabase=2", "redis://h:6379/2"),
        ("redis://already:1/0", "redis://already:1/0"),
    ],
)
def test_stackexchange_connection_strings_become_urls(conn: str, url: str) -> None:
    assert stackexchange_to_url(conn) == url


def test_the_section_is_the_providers_and_reads_seed_values() -> None:
    settings = BrokerSettings(redis={"url": "cache:6380", "claim_timeout": "00:00:07"})
    assert settings.section(RedisSettings).url == "redis://cache:6380"
    assert settings.redis.claim_timeout.total_seconds() == 7


def test_a_bad_value_names_the_section_and_key() -> None:
    with pytest.raises(ConfigurationError, match=r"redis\.max_stream_length=0"):
        BrokerSettings(redis={"max_stream_length": 0})
