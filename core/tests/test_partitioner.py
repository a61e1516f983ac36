"""The partitioner is Kafka's default: murmur2, masked, modulo the partition count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgbroker import murmur2, partition_for

# Test vectors from Apache Kafka's own test suite: clients/src/test/java/org/apache/kafka/
# common/utils/UtilsTest.java, testMurmur2 (the Java client's Utils.murmur2).
KAFKA_UTILS_TEST_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


@pytest.mark.parametrize(("data", "expected"), KAFKA_UTILS_TEST_VECTORS)
def test_murmur2_matches_the_kafka_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_is_the_masked_hash_modulo_the_count() -> None:
    assert partition_for("foobar", 64) == (-790332482 & 0x7FFFFFFF) % 64
    assert partition_for("", 1) == 0


def test_partition_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="partition_count"):
        partition_for("k", 0)


@given(st.text(), st.integers(min_value=1, max_value=4096))
def test_partition_is_in_range_and_depends_only_on_key_and_count(key: str, count: int) -> None:
    first = partition_for(key, count)
    assert 0 <= first < count
    assert partition_for(key, count) == first


@settings(max_examples=5, deadline=None)
@given(st.lists(st.text(), min_size=1, max_size=50))
def test_partitions_are_stable_across_processes_and_hash_seeds(keys: list[str]) -> None:
    code = (
        "import json,sys; from msgbroker import partition_for; "
        "keys=json.loads(sys.stdin.read()); print(json.dumps([partition_for(k, 64) for k in keys]))"
    )
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys), capture_output=True, text=True,
                             env=env, check=True)
        assert json.loads(out.stdout) == [partition_for(k, 64) for k in keys]


def _murmur2_bytewise(data: bytes) -> int:
    """Kafka's Utils.murmur2 transcribed word by word from the Java source (the reference the
    faster word-unpacking implementation is checked against)."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(length // 4):
        i4 = i * 4
        k = data[i4] | (data[i4 + 1] << 8) | (data[i4 + 2] << 16) | (data[i4 + 3] << 24)
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail = length & ~3
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def test_murmur2_matches_the_bytewise_reference_at_every_length() -> None:
    # every tail length, keys short and long (past the precompiled word counts too)
    for length in range(0, 300):
        data = bytes((i * 151 + length * 7) & 0xFF for i in range(length))
        assert murmur2(data) == _murmur2_bytewise(data), length


@given(st.binary(max_size=600))
def test_murmur2_matches_the_bytewise_reference(data: bytes) -> None:
    assert murmur2(data) == _murmur2_bytewise(data)
