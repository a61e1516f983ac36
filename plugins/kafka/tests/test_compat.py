"""The aiokafka version guard (``msgbroker_kafka._compat``): the provider reaches into aiokafka
internals only there, and refuses an aiokafka outside the tested series, naming both versions;
and what those internals do, on the real Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]
from msgbroker.spi import ConfigurationError
from msgbroker_kafka import KafkaTransport, UntestedClientVersion, _compat


def test_the_installed_aiokafka_is_of_the_tested_series() -> None:
    assert _compat.check_client_version() == _compat.installed_version()


@pytest.mark.parametrize("version", ["0.14.0", "0.14.9", "0.14.1rc1"])
def test_a_release_of_the_tested_series_is_accepted(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    assert _compat.check_client_version() == version


@pytest.mark.parametrize("version", ["0.15.0", "0.13.2", "1.14.0", "garbage"])
def test_an_untested_aiokafka_is_refused_naming_it_and_the_tested_range(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    with pytest.raises(UntestedClientVersion) as refused:
        _compat.check_client_version()
    text = str(refused.value)
    assert f"aiokafka {version} is installed" in text
    assert "tested with aiokafka 0.14.x (>=0.14,<0.15)" in text
    assert isinstance(refused.value, ConfigurationError) and isinstance(refused.value, ImportError)


def _run_with_aiokafka(version: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter in which the installed aiokafka reports ``version``."""
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {version!r} if name == 'aiokafka' else real(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_provider_with_an_untested_aiokafka_fails_naming_it() -> None:
    out = _run_with_aiokafka(
        "0.15.0",
        "try:\n    import msgbroker_kafka\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n",
    )
    assert out.startswith("UntestedClientVersion "), out
    assert "aiokafka 0.15.0 is installed" in out


def test_connecting_with_an_untested_aiokafka_says_why_the_provider_is_missing() -> None:
    out = _run_with_aiokafka(
        "0.15.0",
        "import msgbroker\n"
        "try:\n    msgbroker.connect('kafka://127.0.0.1:1')\nexcept msgbroker.ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc)\n",
    )
    assert out.startswith("ProviderNotFoundError "), out
    assert "aiokafka 0.15.0 is installed" in out


def _sockets_to(port: int) -> int:
    """This process's established TCP connections to ``port`` on loopback (Linux /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, state, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        count += remote_port == port and state == "01" and inode in inodes  # 01: ESTABLISHED
    return count


async def test_a_consumer_stop_cut_short_is_finished_closing_its_fetcher_and_connections(
    connect: Callable[..., Any], bootstrap_servers: str, names: Callable[[str], str]
) -> None:
    """A stop() that ends when its group's coordination task is cancelled under it (the crash
    path) leaves the fetcher and the client open; finish_stop closes them."""
    topic, group = names("cut-short"), names("g")
    transport = (await connect()).live_transport()
    assert isinstance(transport, KafkaTransport)
    await transport.ensure_topic(topic, 1)
    port = int(bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    before = _sockets_to(port)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=group, enable_auto_commit=False,
                                session_timeout_ms=6000, heartbeat_interval_ms=1000)
    consumer.subscribe([topic])
    await consumer.start()
    try:
        for _ in range(100):  # joined, fetching
            if consumer.assignment():
                break
            await consumer.getmany(timeout_ms=100)
        assert consumer.assignment()
        routine = _compat.coordination_task(consumer)
        assert routine is not None
        stopping = asyncio.ensure_future(consumer.stop())
        await asyncio.sleep(0)  # stop() waits for the coordination task
        routine.cancel()
        await asyncio.wait({stopping}, timeout=10)
        assert stopping.cancelled(), "stop() was expected to be cut short"
        assert _sockets_to(port) > before, "the cut-short stop left no connection open: nothing to finish"
        await _compat.finish_stop(consumer, 5.0)
        assert _sockets_to(port) == before
    finally:
        await _compat.finish_stop(consumer, 5.0)
