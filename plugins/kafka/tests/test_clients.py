"""A client's start cancelled at any moment leaves no connection open (``_clients.start_client``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings

from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]
from msgbroker_kafka._clients import start_client

STEPS = 60
"""Cancellations 0, 0.2, 0.4 ... 11.8 ms after the start began: aiokafka's bootstrap (a
connection asking for the metadata) takes about 1-3 ms on loopback, so some land in it."""


async def test_a_start_cancelled_at_any_moment_leaves_no_connection_open(bootstrap_servers: str) -> None:
    cancelled_midway = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for step in range(STEPS):
            consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
            starting = asyncio.create_task(start_client(consumer))
            await asyncio.sleep(step / 5000)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            if starting.cancelled():
                cancelled_midway += 1  # start_client stopped the client
            else:
                await consumer.stop()  # the start had ended before the cancellation
            del consumer, starting
            gc.collect()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert cancelled_midway > 0, "no cancellation landed before the start ended: the test did not test it"
    assert unclosed == []
