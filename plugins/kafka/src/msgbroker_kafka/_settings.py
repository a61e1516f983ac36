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
    """Comma-separated ``host:port`` list (a ``kafka://`` URL's host part sets it)."""
    name_prefix: str = ""
    """Put in front of every Kafka topic and consumer group name the provider uses, with a dot:
    ``<prefix>.<topic>``, ``<prefix>.<group>`` (1-100 of ``A-Z a-z 0-9 _ -``, no dot, so that no
    prefix is the start of another's); empty: the names as given. One prefixed ACL per resource
    type then covers an application (docs/security.md)."""
    client_id: str = "msgbroker"
    """The Kafka client id of every connection (broker logs and quotas show it)."""
    replication_factor: int | None = Field(None, ge=1)
    """Replicas of each topic the provider creates (``<topic>``, ``<topic>.dlq`` and
    ``<topic>.dlq.removed``); None takes the brokers' ``default.replication.factor``."""
    min_insync_replicas: int | None = Field(None, ge=1)
    """``min.insync.replicas`` of each topic the provider creates: how many replicas must have a
    record before an ``acks=all`` produce is confirmed; None takes the brokers' default."""
    security_protocol: str = "PLAINTEXT"
    """``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``."""
    sasl_mechanism: str | None = None
    """SASL mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: str | None = Field(None, repr=False)
    """SASL password (never shown in reprs or errors)."""
    ssl_cafile: str | None = None
    """The CA certificate (PEM) that signed the brokers' certificates (None: the system's CAs); only
    with ``SSL`` / ``SASL_SSL``."""
    ssl_certfile: str | None = None
    """A client certificate (PEM), only with ``SSL`` / ``SASL_SSL``."""
    ssl_keyfile: str | None = None
    """The client certificate's key (PEM), only with ``SSL`` / ``SASL_SSL``."""
    session_timeout: Duration = timedelta(seconds=6)
    """How long a silent group member keeps its partitions (the broker allows 6 s to 5 min): a
    killed member's partitions, and the message it held, move about 2 s after this."""
    heartbeat_interval: Duration = timedelta(seconds=2)
    """How often a member tells the group coordinator it is alive (under ``session_timeout``)."""
    commit_interval: Duration = timedelta(milliseconds=200)
    """How long acks of first deliveries wait to be committed together (and how often commits are
    retried while they fail)."""
    commit_batch: int = Field(1000, ge=1)
    """Acks that make the background commit go before ``commit_interval`` has passed."""
