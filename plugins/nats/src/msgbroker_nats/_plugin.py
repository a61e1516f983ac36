"""The entry point (group ``msgbroker.providers``) that registers the NATS provider."""

from __future__ import annotations

import msgbroker

from ._transport import NatsTransport

__all__ = ["msgbroker_providers"]


@msgbroker.hookimpl
def msgbroker_providers() -> list[type[msgbroker.Transport]]:
    """The NATS JetStream provider (``nats://``, ``tls://``)."""
    return [NatsTransport]
