"""nats-py's errors mapped into msgbroker's one exception tree, at the edge."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from msgbroker.spi import (
    BrokerConnectionError,
    BrokerTimeoutError,
    BrokerUnavailableError,
    MsgBrokerError,
)

__all__ = ["map_error"]


def map_error(exc: BaseException, doing: str) -> MsgBrokerError:
    """The msgbroker error for a native one (``raise map_error(exc, "...") from exc``)."""
    if isinstance(exc, MsgBrokerError):
        return exc
    if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BrokerTimeoutError(f"nats: timed out {doing}")
    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
                        nats.js.errors.ServiceUnavailableError)):
        return BrokerUnavailableError(f"nats: JetStream did not answer {doing} (is JetStream enabled?)")
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.NoServersError, nats.errors.StaleConnectionError,
                        nats.errors.ConnectionReconnectingError, nats.errors.ConnectionDrainingError,
                        nats.errors.OutboundBufferLimitError, OSError)):
        return BrokerConnectionError(f"nats: connection failed {doing}: {type(exc).__name__} {exc}")
    if isinstance(exc, nats.js.errors.APIError):
        return MsgBrokerError(f"nats: JetStream refused {doing}: {exc.description} "
                              f"(code {exc.code}, err_code {exc.err_code})")
    return MsgBrokerError(f"nats: {doing} failed: {type(exc).__name__}: {exc}")
