"""The Redis provider's own settings section."""

from __future__ import annotations

import pytest
from msgbroker import BrokerSettings, ConfigurationError
from msgbroker_redis import RedisSettings
from msgbroker_redis._clients import node_urls
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


def test_several_hosts_become_several_urls() -> None:
    assert stackexchange_to_url("n1:7001,n2,password=pw") == "redis://:pw@n1:7001,redis://:pw@n2:6379"
    settings = BrokerSettings(redis={"url": ["redis://n1:7001", "redis://n2:7002"]})
    assert settings.redis.url == "redis://n1:7001,redis://n2:7002"
    assert node_urls("rediss://u:pw@n1:7001/0?x=1, n2:7002") == ["rediss://u:pw@n1:7001/0?x=1",
                                                                    "rediss://u:pw@n2:7002/0?x=1"]


def test_cluster_and_wait_settings() -> None:
    settings = BrokerSettings(redis={"cluster": "true", "wait_replicas": 1, "wait_timeout": "00:00:02"})
    assert settings.redis.cluster is True
    assert (settings.redis.wait_replicas, settings.redis.wait_timeout.total_seconds()) == (1, 2)
    assert BrokerSettings().redis.cluster is None and BrokerSettings().redis.wait_replicas == 0
    with pytest.raises(ConfigurationError, match=r"redis\.wait_replicas"):
        BrokerSettings(redis={"wait_replicas": -1})
    with pytest.raises(ConfigurationError, match=r"redis\.wait_timeout"):
        BrokerSettings(redis={"wait_timeout": 0})
