"""Kafka's default partitioner, the one partition function every provider uses."""

from __future__ import annotations

import struct
from functools import lru_cache

__all__ = ["murmur2", "partition_for"]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# Little-endian 32-bit words, read all at once (one C call instead of four indexings and
# three shifts per word); a compiled Struct per word count for keys up to 256 bytes.
_WORDS = [struct.Struct(f"<{n}I").unpack_from for n in range(65)]


def murmur2(data: bytes) -> int:
    """MurmurHash2 (32 bit, seed 0x9747B28C) exactly as Kafka's Java client computes it.

    Returns the signed 32-bit result, like ``org.apache.kafka.common.utils.Utils.murmur2``.
    """
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    count = length >> 2
    if count:
        words = _WORDS[count](data) if count < 65 else struct.unpack_from(f"<{count}I", data)
        for k in words:
            k = (k * _M) & _MASK
            # (a & m) ^ (b & m) == (a ^ b) & m: one mask for h * M and (k ^ k >> 24) * M
            h = ((h * _M) ^ ((k ^ (k >> 24)) * _M)) & _MASK
    rest = length & 3
    if rest:
        end = count << 2
        if rest == 3:
            h ^= data[end + 2] << 16
        if rest >= 2:
            h ^= data[end + 1] << 8
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - 0x100000000 if h & 0x80000000 else h


@lru_cache(maxsize=65536)  # hot keys (session+area) repeat; murmur2 in Python costs ~1-2 µs
def partition_for(key: str, partition_count: int) -> int:
    """``(murmur2(utf8(key)) & 0x7fffffff) % partition_count`` — never Python's ``hash()``."""
    if partition_count < 1:
        raise ValueError(f"partition_count must be at least 1, got {partition_count!r}")
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partition_count
