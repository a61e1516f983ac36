"""The consumer's blocking-read connection (``Reader``): closed while it connects, or its
connect cancelled, it leaves no socket behind (a stopping consumer did, seen on a cluster as
unclosed-socket warnings after the member was gone)."""

from __future__ import annotations

import asyncio
import gc

import pytest
from msgbroker.spi import BrokerClosedError
from msgbroker_redis._clients import Connections, Reader


async def _connections(redis_url: str, prefix: str) -> Connections:
    connections = Connections(redis_url, prefix, None, {})
    await connections.open()
    return connections


async def test_a_reader_closed_while_it_connects_keeps_no_connection(redis_url: str, prefix: str) -> None:
    connections = await _connections(redis_url, prefix)
    try:
        for _ in range(10):
            reader = Reader(connections, f"{prefix}:meta")
            opening = asyncio.ensure_future(reader.open())
            await asyncio.sleep(0)  # the connect has begun
            await reader.close()
            with pytest.raises(BrokerClosedError):
                await opening
            with pytest.raises(BrokerClosedError):
                await reader.open()
            del reader, opening
            gc.collect()  # an unclosed socket warns here, which fails the test
    finally:
        await connections.close()


async def test_a_reader_whose_connect_is_cancelled_keeps_no_connection(redis_url: str, prefix: str) -> None:
    connections = await _connections(redis_url, prefix)
    try:
        for _ in range(10):
            reader = Reader(connections, f"{prefix}:meta")
            opening = asyncio.ensure_future(reader.open())
            await asyncio.sleep(0)
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            del reader, opening
            gc.collect()
    finally:
        await connections.close()


async def test_two_connects_of_one_reader_keep_one_connection(redis_url: str, prefix: str) -> None:
    connections = await _connections(redis_url, prefix)
    try:
        reader = Reader(connections, f"{prefix}:meta")
        await asyncio.gather(reader.open(), reader.open())
        await reader.close()
        del reader
        gc.collect()
    finally:
        await connections.close()
