"""The pluggy hook that registers the Kafka provider (entry point ``msgbroker.providers``)."""

from __future__ import annotations

import msgbroker
from msgbroker import Transport

from ._transport import KafkaTransport

__all__ = ["msgbroker_providers"]


@msgbroker.hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    """The providers of this distribution."""
    return [KafkaTransport]
