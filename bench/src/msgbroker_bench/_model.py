"""What every variant sends: the same fields, the same payload bytes, a send stamp and a sequence."""

from __future__ import annotations

import json
import time
from array import array
from typing import Any

from msgbroker import Message

__all__ = ["BenchMessage", "Seat", "Sink", "decode_raw", "encode_raw", "key_of", "payload"]

KEYS = 10_000
"""Distinct partition keys (the issue's "10k keys")."""

_PAYLOADS: dict[int, str] = {}


def payload(size: int) -> str:
    """A payload string of ``size`` ASCII bytes (cached: building it is not what we measure)."""
    text = _PAYLOADS.get(size)
    if text is None:
        text = _PAYLOADS[size] = ("0123456789abcdef" * (size // 16 + 1))[:size]
    return text


_KEY_NAMES = [f"session-{i:05d}:area-{i % 97:02d}" for i in range(KEYS)]


def key_of(seq: int) -> str:
    """The partition key of message ``seq``: 10k keys, round robin (so each key's messages are
    in increasing ``seq`` order, which is what the order check relies on)."""
    return _KEY_NAMES[seq % KEYS]


class BenchMessage(Message):
    """Our message: the user's four fields on top of the envelope (id, correlation id, time)."""

    key: str
    seq: int
    run: int
    sent_ns: int
    data: str

    @property
    def partition_key(self) -> str:
        return self.key


class Seat(Message):
    """100 B of JSON with the id: a seat-lock request of the seed's ticket sale (the standalone
    scripts' message, ``bench/*.py``)."""

    key: str
    seq: int
    data: str

    @property
    def partition_key(self) -> str:
        return self.key


def encode_raw(seq: int, run: int, sent_ns: int, data: str) -> bytes:
    """What a raw-client user sends: the same four fields as JSON (``json.dumps``)."""
    return json.dumps({"key": key_of(seq), "seq": seq, "run": run, "sent_ns": sent_ns, "data": data}).encode()


def decode_raw(body: bytes | str) -> dict[str, Any]:
    """What a raw-client user does with a body: ``json.loads``."""
    value: dict[str, Any] = json.loads(body)
    return value


_PARTITION_TABLES: dict[int, array[int]] = {}


def partition_table(partitions: int) -> array[int]:
    """The partition of each of the 10k keys under ``partitions`` (msgbroker's partitioner)."""
    table = _PARTITION_TABLES.get(partitions)
    if table is None:
        from msgbroker import partition_for

        table = _PARTITION_TABLES[partitions] = array("i", (partition_for(k, partitions) for k in _KEY_NAMES))
    return table


class Sink:
    """Where every variant's handler reports: counts, duplicates, order violations per partition
    (each partition's messages must be handled in publish order when ordered), and
    publish→handler latency (nanoseconds, ``time.perf_counter_ns`` of the same process)."""

    def __init__(self) -> None:
        import asyncio

        self.run = -1
        self.target = 0
        self.count = 0
        self.dups = 0
        self.stray = 0
        self.order_violations = 0
        self.resume_at = 0
        self.seen = bytearray()
        self.parts = partition_table(64)
        self.last = array("q", [-1]) * 64
        self.latencies = array("q")
        self.done = asyncio.Event()
        self.progress = asyncio.Event()

    def arm(self, run: int, target: int, partitions: int = 64) -> None:
        """Start counting messages of ``run`` (others are counted as stray and ignored), checking
        order per partition of ``partitions``."""
        self.run = run
        self.target = target
        self.count = 0
        self.dups = 0
        self.stray = 0
        self.order_violations = 0
        self.resume_at = 0
        self.seen = bytearray(target)
        self.parts = partition_table(partitions)
        self.last = array("q", [-1]) * partitions
        self.latencies = array("q")
        self.done.clear()
        self.progress.clear()

    def record(self, run: int, seq: int, sent_ns: int) -> None:
        """One handled message (call it from the handler, before acking)."""
        now = time.perf_counter_ns()
        if run != self.run or seq >= self.target:
            self.stray += 1
            return
        if self.seen[seq]:
            self.dups += 1
            return
        self.seen[seq] = 1
        part = self.parts[seq % KEYS]
        if seq < self.last[part]:
            self.order_violations += 1
        self.last[part] = seq
        self.count += 1
        self.latencies.append(now - sent_ns)
        if self.count >= self.resume_at:
            self.progress.set()
        if self.count >= self.target:
            self.done.set()
