"""The pluggy entry point (``msgbroker.providers``) that offers the Redis provider."""

from __future__ import annotations

import msgbroker
from msgbroker import Transport

from ._transport import RedisTransport

__all__ = ["msgbroker_providers"]


@msgbroker.hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    """The Redis Streams provider, for ``redis://`` and ``rediss://``."""
    return [RedisTransport]
