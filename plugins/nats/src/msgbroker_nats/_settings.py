"""The NATS JetStream provider's settings section, ``nats`` (``BrokerSettings().nats``,
``MSGBROKER_NATS__<KEY>``, a settings file's ``Nats`` section). See docs/providers/nats.md."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from msgbroker.spi import Duration, ProviderSettings
from pydantic import Field, field_validator

__all__ = ["NatsSettings", "server_urls"]


def server_urls(url: str) -> list[str]:
    """The servers of ``nats.url``: one URL, or several comma-separated (a cluster's nodes; nats-py
    takes them as its ``servers`` and learns the others from the cluster)."""
    return [u.strip() for u in url.split(",") if u.strip()]


class NatsSettings(ProviderSettings):
    """NATS JetStream provider."""

    url: str = "nats://localhost:4222"
    """A server URL, or several comma-separated (or a list): the nodes of a NATS cluster."""
    stream_prefix: str = "MSGBROKER"
    """First subject token and head of every stream name (``A-Z a-z 0-9 _ -``)."""
    max_age: Duration = timedelta(days=7)
    """The streams' retention (0: unlimited)."""
    ack_wait: Duration = timedelta(seconds=5)
    """How long a silent member keeps a message: with the lease time (half of it), the failover
    time after a crash."""
    max_deliver: int = Field(5, ge=-1)
    """Accepted for the seed's sake; the server-side limit is always unlimited (``max_retry_attempts``
    decides, docs/providers/nats.md)."""
    max_ack_pending: int = Field(64, ge=1, le=10_000)
    """Messages of a lane in flight at once to the member that owns it (read ahead, handed to
    the handler in order; the lanes' consumers get twice this as their ``max_ack_pending``);
    1 is one round trip per message."""
    nkeys_seed: str | None = Field(None, repr=False)
    """An NKey user's seed (``SU...``): the connection logs in by signing the server's challenge
    with it instead of a password in the URL (never shown in reprs, errors or logs)."""
    nkeys_seed_file: str | None = None
    """A file holding an NKey user's seed (``nsc``'s and ``nk -gen user``'s ``.nk`` files), read
    at each login; instead of ``nkeys_seed``."""
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a ``tls://``
    url (and a ``nats://`` one to a server that requires TLS); None trusts the system's CAs."""
    max_consumers: int | None = Field(None, ge=1)
    """How many consumers a topic's stream may have: each group of the topic takes one per
    partition. None: 64 groups' worth (``64 * partition_count``), at least 1,000. nats-server 2.15
    limits a stream that sets none to 1,000 (``default_max_consumers``): 1,024 partitions did not
    fit one group."""
    replicas: int = Field(1, ge=1, le=5)
    """How many servers of a JetStream cluster keep each stream the provider creates (the topics',
    their ``<topic>.dlq`` and the KV buckets'), and so its consumers: 1 on a single server; 3
    survives the loss of one node of three."""

    @field_validator("url", mode="before")
    @classmethod
    def _servers(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v).strip() for v in value)
        return value
