"""The Apache Kafka provider's settings section, ``kafka`` (``BrokerSettings().kafka``,
``MSGBROKER_KAFKA__<KEY>``, a settings file's ``Kafka`` section). See docs/providers/kafka.md."""

from __future__ import annotations

from datetime import timedelta

from msgbroker.spi import Duration, ProviderSettings
from pydantic import Field

__all__ = ["KafkaSettings"]


class KafkaSettings(ProviderSettings):
    """Apache Kafka provider."""

    bootstrap_servers: str = "localhost:9092"
    client_id: str = "msgbroker"
    replication_factor: int | None = Field(None, ge=1)
    """Replicas of each topic the provider creates (``<topic>``, ``<topic>.dlq`` and
    ``<topic>.dlq.removed``); None takes the brokers' ``default.replication.factor``."""
    min_insync_replicas: int | None = Field(None, ge=1)
    """``min.insync.replicas`` of each topic the provider creates: how many replicas must have a
    record before an ``acks=all`` produce is confirmed; None takes the brokers' default."""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = Field(None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_timeout: Duration = timedelta(seconds=10)
    """How long a silent group member keeps its partitions (the broker allows 6 s to 5 min)."""
    heartbeat_interval: Duration = timedelta(seconds=3)
    """How often a member tells the group coordinator it is alive (under ``session_timeout``)."""
    commit_interval: Duration = timedelta(milliseconds=200)
    """How long acks of first deliveries wait to be committed together (and how often commits are
    retried while they fail)."""
    commit_batch: int = Field(1000, ge=1)
    """Acks that make the background commit go before ``commit_interval`` has passed."""
