"""The NATS JetStream provider's settings section, ``nats`` (``BrokerSettings().nats``,
``MSGBROKER_NATS__<KEY>``, a settings file's ``Nats`` section). See docs/providers/nats.md."""

from __future__ import annotations

from datetime import timedelta

from msgbroker.spi import Duration, ProviderSettings
from pydantic import Field

__all__ = ["NatsSettings"]


class NatsSettings(ProviderSettings):
    """NATS JetStream provider."""

    url: str = "nats://localhost:4222"
    stream_prefix: str = "MSGBROKER"
    max_age: Duration = timedelta(days=7)
    ack_wait: Duration = timedelta(seconds=30)
    max_deliver: int = Field(5, ge=-1)
    ssl_cafile: str | None = None
    """The CA certificate bundle (PEM) that signed the server's TLS certificate, for a ``tls://``
    url (and a ``nats://`` one to a server that requires TLS); None trusts the system's CAs."""
