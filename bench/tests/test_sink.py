"""The sink every handler reports to: duplicates, strays, per-key order."""

from __future__ import annotations

import asyncio

from msgbroker_bench._model import KEYS, Sink


async def test_sink_counts_once_and_flags_order_violations() -> None:
    sink = Sink()
    sink.arm(7, KEYS + 2)
    sink.record(7, KEYS, 0)  # key 0, seq 10000
    sink.record(7, 0, 0)  # key 0, seq 0: earlier than the one already handled
    sink.record(7, 0, 0)  # duplicate
    sink.record(6, 1, 0)  # another run's message
    assert (sink.count, sink.dups, sink.stray, sink.order_violations) == (2, 1, 1, 1)
    assert not sink.done.is_set()


async def test_sink_is_done_at_the_target() -> None:
    sink = Sink()
    sink.arm(1, 2)
    sink.record(1, 1, 0)
    assert not sink.done.is_set()
    sink.record(1, 0, 0)
    assert sink.done.is_set()
    assert len(sink.latencies) == 2
    await asyncio.sleep(0)
