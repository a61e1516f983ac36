"""The sink every handler reports to: duplicates, strays, per-key order."""

from __future__ import annotations

import asyncio

from msgbroker import partition_for

from msgbroker_bench._model import KEYS, Sink, key_of, partition_table


async def test_sink_counts_once_and_flags_order_violations() -> None:
    sink = Sink()
    sink.arm(7, KEYS + 2, partitions=1)
    sink.record(7, KEYS, 0)  # seq 10000
    sink.record(7, 0, 0)  # seq 0, same (only) partition: earlier than the one already handled
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


def test_partition_table_is_msgbrokers_partitioner() -> None:
    table = partition_table(64)
    assert [table[i] for i in (0, 1, 9_999)] == [partition_for(key_of(i), 64) for i in (0, 1, 9_999)]
