"""The pluggy entry point (``msgbroker.providers``) that offers the RabbitMQ provider."""

from __future__ import annotations

import msgbroker
from msgbroker import Transport

from ._transport import RabbitMQTransport

__all__ = ["msgbroker_providers"]


@msgbroker.hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    """The RabbitMQ provider, for ``amqp://`` and ``amqps://``."""
    return [RabbitMQTransport]
