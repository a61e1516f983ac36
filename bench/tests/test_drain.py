"""The drain cell: its backlog's numbering, a worker's tally, the worker protocol, a whole drain."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import msgbroker
import pytest

from msgbroker_bench._common import DRAIN_KEYS, reachable
from msgbroker_bench._drain import DrainVariant, ProcessHandle, Tally, drain_seqs, index_of, serve, union_count
from msgbroker_bench._model import KEYS, BenchMessage, key_of, partition_table
from msgbroker_bench._ours import OursDriver
from msgbroker_bench._raw import raw_driver


def test_backlog_numbering_covers_every_message_once_over_the_drain_keys() -> None:
    n = 2 * DRAIN_KEYS + 345
    batches = drain_seqs(n, 500)
    seqs = [seq for batch in batches for seq in batch]
    assert all(len(batch) <= 500 for batch in batches)
    assert sorted(index_of(seq) for seq in seqs) == list(range(n))
    assert {key_of(seq) for seq in seqs} == {key_of(i) for i in range(DRAIN_KEYS)}
    # each key's numbers rise in publish order (what the order check relies on)
    last: dict[str, int] = {}
    for seq in seqs:
        assert seq > last.get(key_of(seq), -1)
        last[key_of(seq)] = seq


def test_tally_counts_once_and_flags_order_violations_per_partition() -> None:
    tally = Tally(64)
    tally.arm(3, 3 * DRAIN_KEYS)
    later, earlier = 2 * KEYS + 5, KEYS + 5  # the same key: one partition
    assert partition_table(64)[later % KEYS] == partition_table(64)[earlier % KEYS]
    tally.record(3, later)
    tally.record(3, earlier)  # handled after a later one of its partition
    tally.record(3, earlier)  # duplicate
    tally.record(2, 0)  # another run's
    tally.record(3, 3 * KEYS)  # beyond the backlog
    assert (tally.count, tally.dups, tally.stray, tally.order_violations) == (2, 1, 2, 1)
    first, last = tally.first_ns, tally.last_ns
    assert 0 < first <= last
    tally.stamp()
    assert tally.last_ns >= last


def test_union_counts_messages_handled_by_any_worker() -> None:
    a, b = Tally(), Tally()
    for tally in (a, b):
        tally.arm(1, 5)
    for seq in (0, 1, 2):
        a.record(1, seq)
    for seq in (2, 3):
        b.record(1, seq)
    assert union_count([a.report(), b.report()], 5) == 4


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", ["ours", "raw"])
async def test_a_memory_drain_handles_the_backlog(name: str, workers: int) -> None:
    driver = OursDriver("memory", "memory://", 64) if name == "ours" else raw_driver("memory", "")
    variant = DrainVariant(name, driver, messages=700, workers=workers, processes=False, timeout=30, warm=50)
    await variant.setup()
    try:
        result = await variant.rep(1)
    finally:
        await variant.teardown()
    assert result["status"] == "ok"
    assert (result["messages"], result["dups"]) == (700, 0)
    assert result["seconds"] > 0 and result["cpu"] > 0 and result["first_ms"] >= 0
    if name == "ours":
        assert result["order_violations"] == 0


async def test_the_worker_protocol_arms_goes_reports_and_quits() -> None:
    """``serve`` (the worker process's loop) on an in-process memory broker."""
    url = "memory://bench-drain-protocol"
    spec = {"kind": "ours", "provider": "memory", "url": url, "partitions": 64, "overrides": {},
            "topic": "drain-protocol", "group": "g"}
    commands: asyncio.Queue[bytes] = asyncio.Queue()
    out: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    def write(message: dict[str, Any]) -> None:
        out.append(message)
        arrived.set()

    async def until(done: Any) -> None:
        async with asyncio.timeout(20):
            while not done():
                arrived.clear()
                await arrived.wait()

    worker = asyncio.create_task(serve(json.dumps(spec), commands.get, write))
    publisher = await msgbroker.connect(url, partition_count=64)
    try:
        await until(lambda: out)
        assert out[-1] == {"op": "ready"}
        for command in ({"op": "arm", "run": 4, "n": 300}, {"op": "go"}):
            await commands.put(json.dumps(command).encode())
        for seqs in drain_seqs(300, 100):
            await publisher.publish_batch("drain-protocol", [
                BenchMessage(key=key_of(s), seq=s, run=4, sent_ns=0, data="x") for s in seqs])
        await until(lambda: any(m["op"] == "count" and m["count"] == 300 for m in out))
        await commands.put(b'{"op": "stop"}')
        await commands.put(b'{"op": "quit"}')
        await asyncio.wait_for(worker, 30)
    finally:
        await publisher.close()
        msgbroker.testing.forget_memory_broker("bench-drain-protocol")
    ops = [m["op"] for m in out]
    assert ops[:2] == ["ready", "armed"] and ops[-2:] == ["report", "bye"]
    report = out[-2]
    assert (report["count"], report["dups"], report["order_violations"]) == (300, 0, 0)
    assert union_count([report], 300) == 300
    assert report["cpu"] > 0


async def test_a_worker_process_answers_and_exits() -> None:
    handle = ProcessHandle({"kind": "ours", "provider": "memory", "url": "memory://nobody", "partitions": 64,
                            "overrides": {}, "topic": "empty", "group": "g"})
    await handle.open(timeout=60)
    try:
        await handle.arm(1, 10)
        await handle.go()
        report = await handle.stop()
    finally:
        await handle.close()
    assert (report["count"], report["stray"]) == (0, 0)
    assert handle.proc is not None and handle.proc.returncode == 0


REDIS = os.environ.get("MSGBROKER_REDIS__URL", "")


@pytest.mark.parametrize("name", ["ours", "raw"])
async def test_a_drain_by_two_worker_processes_on_redis(name: str) -> None:
    from msgbroker_bench._common import ours_overrides

    if not REDIS or not reachable(REDIS, 6379):  # a missing server fails, it does not skip
        pytest.fail("no Redis server: run `scripts/brokers up redis` and `set -a; . .brokers/env; set +a`")

    driver = (OursDriver("redis", REDIS, 64, ours_overrides("redis")) if name == "ours"
              else raw_driver("redis", REDIS))
    variant = DrainVariant(name, driver, messages=600, workers=2, processes=True, timeout=60, warm=50)
    try:
        await variant.setup()
        result = await variant.rep(1)
    finally:
        await variant.teardown()
    assert result["status"] == "ok"
    assert (result["messages"], result["dups"]) == (600, 0)
    assert result["cpu"] > 0
    if name == "ours":
        assert result["order_violations"] == 0



def test_the_report_puts_the_drain_table_first_and_judges_it() -> None:
    from msgbroker_bench._report import Results, drain_section, targets

    def row(cell: str, variant: str, rep: int, rate: float, cpu: float) -> dict[str, str]:
        workers = cell.split()[1]
        return {"provider": "redis", "workload": "drain", "cell": cell, "variant": variant, "kind": variant,
                "rep": str(rep), "workers": workers, "messages": "20000", "msgs_per_s": str(rate),
                "cpu_us_per_msg": str(cpu), "first_ms": "50", "status": "ok"}

    rows = [row("drain 1 worker", "ours", 1, 900, 12), row("drain 1 worker", "raw", 1, 1000, 10),
            row("drain 4 workers", "ours", 1, 700, 14), row("drain 4 workers", "raw", 1, 1000, 10)]
    results = Results(rows)
    table = drain_section(results)
    assert "| redis | 1 (processes) | 900 | 1,000 | 0.90 | 12; 10 | 50; 50 | 20,000 |" in table
    assert "| redis | 4 (processes) | 700 | 1,000 | 0.70 | 14; 10 | 50; 50 | 20,000 |" in table
    (judged,) = [line for line in targets(results) if line.startswith("| ordered drain")]
    assert "drain 1 worker: 0.90; drain 4 workers: 0.70 | partly |" in judged
