"""The aio-pika / aiormq version guard (``msgbroker_rabbitmq._compat``): the provider reaches past
the client libraries' abstract interfaces only there, and refuses either library outside its
tested series, naming both versions."""

from __future__ import annotations

import subprocess
import sys

import pytest
from msgbroker.spi import ConfigurationError
from msgbroker_rabbitmq import UntestedClientVersion, _compat


def _report(versions: dict[str, str]) -> object:
    """An ``installed_version`` that reports ``versions`` and the real one for the others."""
    real = _compat.installed_version
    return lambda distribution: versions.get(distribution) or real(distribution)


def test_the_installed_aio_pika_and_aiormq_are_of_the_tested_series() -> None:
    found = _compat.check_client_versions()
    assert found == {name: _compat.installed_version(name) for name in ("aio-pika", "aiormq")}


@pytest.mark.parametrize("versions", [{"aio-pika": "10.2.9"}, {"aiormq": "7.2.0"}, {"aio-pika": "10.2.2rc1"}])
def test_releases_of_the_tested_series_are_accepted(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str]) -> None:
    monkeypatch.setattr(_compat, "installed_version", _report(versions))
    found = _compat.check_client_versions()
    assert {name: found[name] for name in versions} == versions


@pytest.mark.parametrize(
    ("distribution", "version", "tested"),
    [
        ("aio-pika", "10.3.0", "aio-pika 10.2.x (>=10.2,<10.3)"),
        ("aio-pika", "9.5.1", "aio-pika 10.2.x (>=10.2,<10.3)"),
        ("aiormq", "7.3.0", "aiormq 7.2.x (>=7.2,<7.3)"),
        ("aiormq", "6.8.0", "aiormq 7.2.x (>=7.2,<7.3)"),
        ("aiormq", "garbage", "aiormq 7.2.x (>=7.2,<7.3)"),
    ],
)
def test_an_untested_client_is_refused_naming_it_and_the_tested_range(
    monkeypatch: pytest.MonkeyPatch, distribution: str, version: str, tested: str
) -> None:
    monkeypatch.setattr(_compat, "installed_version", _report({distribution: version}))
    with pytest.raises(UntestedClientVersion) as refused:
        _compat.check_client_versions()
    text = str(refused.value)
    assert f"{distribution} {version} is installed" in text
    assert f"tested with {tested}" in text
    assert isinstance(refused.value, ConfigurationError) and isinstance(refused.value, ImportError)


def _run_with(distribution: str, version: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter in which the installed ``distribution`` reports ``version``."""
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {version!r} if name == {distribution!r} else real(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_provider_with_an_untested_aiormq_fails_naming_it() -> None:
    out = _run_with(
        "aiormq", "7.3.0",
        "try:\n    import msgbroker_rabbitmq\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n",
    )
    assert out.startswith("UntestedClientVersion "), out
    assert "aiormq 7.3.0 is installed" in out


def test_connecting_with_an_untested_aio_pika_says_why_the_provider_is_missing() -> None:
    out = _run_with(
        "aio-pika", "10.3.0",
        "import msgbroker\n"
        "try:\n    msgbroker.connect('amqp://127.0.0.1:1')\nexcept msgbroker.ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc)\n",
    )
    assert out.startswith("ProviderNotFoundError "), out
    assert "aio-pika 10.3.0 is installed" in out


async def test_a_connection_s_outgoing_frames_are_not_bounded_so_no_close_ok_is_dropped() -> None:
    """aiormq drops its answer to the server's ``channel.close`` when its frame queue (10 frames)
    is full (``put_nowait``, ``QueueFull`` ignored); the provider's connections lift that bound
    (the behaviour it protects: ``test_nodes.py``, channel numbers wrapping). This pins the
    internal it relies on: the queue is an ``asyncio.Queue`` shared by the writer and channels."""
    import asyncio
    import os

    import aio_pika

    url = os.environ.get("MSGBROKER_RABBITMQ__URL")
    if not url:
        pytest.fail("MSGBROKER_RABBITMQ__URL is not set: run `scripts/brokers up rabbitmq` (or use scripts/test)")
    conn = await aio_pika.connect(url)
    try:
        queue = conn.transport.connection.write_queue
        assert isinstance(queue, asyncio.Queue) and queue.maxsize == 10
        _compat.unbounded_writes(conn)
        assert queue.maxsize == 0
        for _ in range(50):
            queue.put_nowait(None)  # would raise QueueFull past 10
        while not queue.empty():  # leave nothing for the writer
            queue.get_nowait()
    finally:
        await conn.close()
