"""The nats-py version guard (``msgbroker_nats._compat``): the provider reaches into nats-py
internals only there, and refuses a nats-py outside the tested series, naming both versions."""

from __future__ import annotations

import subprocess
import sys

import pytest
from msgbroker.spi import ConfigurationError
from msgbroker_nats import UntestedClientVersion, _compat


def test_the_installed_nats_py_is_of_the_tested_series() -> None:
    assert _compat.check_client_version() == _compat.installed_version()


@pytest.mark.parametrize("version", ["2.16.0", "2.16.9", "2.16.1rc1"])
def test_a_release_of_the_tested_series_is_accepted(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    assert _compat.check_client_version() == version


@pytest.mark.parametrize("version", ["2.17.0", "2.15.2", "3.16.0", "garbage"])
def test_an_untested_nats_py_is_refused_naming_it_and_the_tested_range(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(_compat, "installed_version", lambda: version)
    with pytest.raises(UntestedClientVersion) as refused:
        _compat.check_client_version()
    text = str(refused.value)
    assert f"nats-py {version} is installed" in text
    assert "tested with nats-py 2.16.x (>=2.16,<2.17)" in text
    assert isinstance(refused.value, ConfigurationError) and isinstance(refused.value, ImportError)


def _run_with_nats_py(version: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter in which the installed nats-py reports ``version``."""
    prelude = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {version!r} if name == 'nats-py' else real(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_provider_with_an_untested_nats_py_fails_naming_it() -> None:
    out = _run_with_nats_py(
        "2.17.0",
        "try:\n    import msgbroker_nats\nexcept ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n",
    )
    assert out.startswith("UntestedClientVersion "), out
    assert "nats-py 2.17.0 is installed" in out


def test_connecting_with_an_untested_nats_py_says_why_the_provider_is_missing() -> None:
    out = _run_with_nats_py(
        "2.17.0",
        "import msgbroker\n"
        "try:\n    msgbroker.connect('nats://127.0.0.1:1')\nexcept msgbroker.ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc)\n",
    )
    assert out.startswith("ProviderNotFoundError "), out
    assert "nats-py 2.17.0 is installed" in out


async def test_a_reconnect_to_a_server_that_drops_the_connection_closes_its_socket(nats_url: str) -> None:
    """A restarting cluster node accepts a connection and drops it before its INFO: nats-py (2.16)
    then opens the next attempt's socket over the dropped one without closing it (an unclosed
    socket for the garbage collector; a ResourceWarning, an error under this test suite).
    The client connects through a proxy to the real server; the proxy cuts the connection, then
    drops three connections at once, then lets the next one through."""
    import asyncio
    import gc
    from urllib.parse import urlsplit

    target = urlsplit(nats_url)
    drops = {"left": 0}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    links: list[asyncio.Task[None]] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if drops["left"] > 0:
            drops["left"] -= 1
            writer.close()  # a node that is restarting
            return
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        links.extend([asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))])

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = _compat.Client()
    try:
        await nc.connect(servers=[f"nats://127.0.0.1:{port}"], reconnect_time_wait=0.05, max_reconnect_attempts=-1,
                         reconnected_cb=on_reconnect, connect_timeout=2)
        drops["left"] = 3
        for link in links:
            link.cancel()  # the node goes away
        await asyncio.wait_for(reconnected.wait(), 20)
        assert drops["left"] == 0
        await nc.flush(timeout=5)
        gc.collect()  # an unclosed socket of a dropped attempt warns here
    finally:
        await nc.close()
        proxy.close()
        for link in links:
            link.cancel()
        await asyncio.gather(*links, return_exceptions=True)
