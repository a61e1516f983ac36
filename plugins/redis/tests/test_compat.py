"""The redis-py version guard (``msgbroker_redis._compat``): the provider reaches into redis-py
internals only there, and refuses a redis-py outside the tested series, naming both versions."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from msgbroker.spi import ConfigurationError
from msgbroker_redis import UntestedClientVersion, _compat


def test_the_installed_redis_py_is_of_the_tested_series() -> None:
    assert _compat.check_client_version() == _compat.installed_version()


@pytest.mark.parametrize("version", ["8.1.0", "8.1.9", "8.1.1rc1"])
def test_a_release_of_the_tested_series_is_accepted(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    assert _compat.check_client_version() == version


@pytest.mark.parametrize("version", ["8.2.0", "8.0.5", "5.0.1", "garbage"])
def test_an_untested_redis_py_is_refused_naming_it_and_the_tested_range(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    with pytest.raises(UntestedClientVersion) as refused:
        _compat.check_client_version()
    text = str(refused.value)
    assert f"redis {version} is installed" in text
    assert "tested with redis 8.1.x (>=8.1,<8.2)" in text
    assert isinstance(refused.value, ConfigurationError) and isinstance(refused.value, ImportError)


def _run_with_redis_py(version: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter in which the installed redis-py reports ``version``."""
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {version!r} if name == 'redis' else real(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_provider_with_an_untested_redis_py_fails_naming_it() -> None:
    out = _run_with_redis_py(
        "8.2.0",
        "try:\n    import msgbroker_redis\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n",
    )
    assert out.startswith("UntestedClientVersion "), out
    assert "redis 8.2.0 is installed" in out


def test_connecting_with_an_untested_redis_py_says_why_the_provider_is_missing() -> None:
    out = _run_with_redis_py(
        "8.2.0",
        "import msgbroker\n"
        "try:\n    msgbroker.connect('redis://127.0.0.1:1')\nexcept msgbroker.ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc)\n",
    )
    assert out.startswith("ProviderNotFoundError "), out
    assert "redis 8.2.0 is installed" in out



async def test_a_timed_write_to_a_server_that_stopped_reading_fails_after_the_socket_timeout_and_closes(
    redis_url: str, raw: Any
) -> None:
    """``timed_sends`` keeps redis-py's write timeout (with ``asyncio.timeout``, no task per
    command): a server that stopped reading — here the real server busy in a 2-s script, which
    reads no socket meanwhile — lets the socket's buffers fill, and a large write fails with
    redis-py's TimeoutError after ``socket_timeout``, the connection closed."""
    from redis import exceptions as rex
    from redis.asyncio.connection import Connection

    timed = _compat.timed_sends(Connection)
    assert _compat.timed_sends(Connection) is timed  # one class per connection class
    pool = aioredis.ConnectionPool.from_url(redis_url, socket_timeout=0.5)
    pool.connection_class = timed_sends = _compat.timed_sends(pool.connection_class)
    connection = pool.make_connection()
    assert isinstance(connection, timed_sends)
    await connection.connect()
    busy = asyncio.ensure_future(raw.eval(
        "local t = redis.call('TIME'); local s = t[1] + t[2] / 1e6 "
        "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 - s > 2 return 1", 0))
    try:
        await asyncio.sleep(0.2)  # the script runs: the server reads nothing until it ends
        started = time.monotonic()
        with pytest.raises(rex.TimeoutError, match="Timeout writing to socket"):
            await connection.send_packed_command(b"*1\r\n$4\r\nPING\r\n" * 4_000_000)  # 56 MB
        assert time.monotonic() - started < 1.9  # not once the server read again
        assert not connection.is_connected
    finally:
        assert await busy == 1
        await connection.disconnect()
        await pool.aclose()
