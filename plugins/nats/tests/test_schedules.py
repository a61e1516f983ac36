"""Scheduled messages (semantics rule 14) on a nats-server with message schedules (2.12+).

The server of ``scripts/brokers up nats`` is a 2.15.3 as well (Debian's 2.9.10 with
``MSGBROKER_BROKERS_NATS_VERSION=debian``, which has none: there test_conformance.py checks that
scheduling is declared missing, naming the version; so does test_auth.py against nats-auth,
Debian's). The scheduling cases run here against a nats-server 2.15.3 of this module's own — the binary that
``scripts/brokers cluster install nats`` (or ``cluster up nats``) builds into ``.cache/nats-server/``,
built here first when it is missing — on a free loopback port with a fresh store, restarted by
the cases' ``restart_server`` hook.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker_conformance import ConformanceHarness, ScheduleCases
from msgbroker_nats import NatsTransport
from msgbroker_nats._schedule import server_version

REPO = Path(__file__).resolve().parents[3]
VERSION = os.environ.get("MSGBROKER_BROKERS_NATS_CLUSTER_VERSION", "v2.15.3")
BINARY = REPO / ".cache" / "nats-server" / VERSION / "nats-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Server:
    """One nats-server with JetStream on loopback, its store in a temporary folder."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="msgbroker-nats-schedules-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.dir / "nats.log").open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [str(BINARY), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "jetstream")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while server_version.__wrapped__(self.url) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {VERSION} did not start on port {self.port}: see {self.dir}/nats.log")
            time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class SchedulesHarness(ConformanceHarness):
    """The module's nats-server 2.15.3; a stream prefix per case."""

    url: ClassVar[str | None] = None  # type: ignore[misc]
    server: ClassVar[_Server | None] = None
    timeout_multiplier = 1.0

    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"nats": {"stream_prefix": f"SCHED-{namespace}", "ack_wait": 2}}

    async def restart_server(self) -> None:
        """Stop the module's server (SIGTERM) and start it again on the same port and store."""
        import asyncio

        assert self.server is not None
        await asyncio.to_thread(self.server.stop)
        await asyncio.to_thread(self.server.start)


@pytest.fixture(scope="module", autouse=True)
def _nats_with_schedules() -> Iterator[_Server]:
    if not os.access(BINARY, os.X_OK):  # a fresh clone: build it (once, with Go; about 40 s)
        built = subprocess.run([str(REPO / "scripts" / "brokers"), "cluster", "install", "nats"], cwd=REPO,
                               capture_output=True, text=True, timeout=900, check=False)
        if built.returncode != 0 or not os.access(BINARY, os.X_OK):
            pytest.fail(f"nats-server {VERSION} is not built at {BINARY} and `scripts/brokers cluster install nats` "
                        f"failed (exit {built.returncode}): {(built.stdout + built.stderr)[-2000:]}", pytrace=False)
    server = _Server()
    server.start()
    SchedulesHarness.url = server.url
    SchedulesHarness.server = server
    try:
        yield server
    finally:
        server.stop()


class TestNatsSchedules(ScheduleCases):
    harness = SchedulesHarness()


class _Ping(msgbroker.Message):
    pass


def test_the_declaration_follows_the_server_version() -> None:
    """2.9.10 (the Debian server): scheduling missing, naming the version; 2.12 and later: native."""
    old = NatsTransport.capabilities_for_server("2.9.10")
    assert old.scheduling == "none" and "2.9.10" in old.reasons["scheduling"]
    assert NatsTransport.capabilities_for_server("2.12.0").scheduling == "native"
    assert NatsTransport.capabilities_for_server(VERSION.lstrip("v")).scheduling == "native"


def test_a_connected_broker_declares_what_its_server_can(_nats_with_schedules: _Server) -> None:
    import asyncio

    async def run() -> None:
        async with msgbroker.connect(_nats_with_schedules.url) as broker:
            assert broker.capabilities.scheduling == "native"
        debian = os.environ.get("MSGBROKER_NATS__URL")
        if debian and (server_version(debian) or "").startswith("2.9."):
            async with msgbroker.connect(debian) as broker:
                assert broker.capabilities.scheduling == "none"
                with pytest.raises(msgbroker.CapabilityNotSupported, match=r"scheduling.*2\.9\.10"):
                    await broker.publish("t", _Ping(), delay=1)

    asyncio.run(run())


class _Numbered(msgbroker.Message):
    n: int


def test_a_schedule_no_stream_hears_yet_is_sent_again(_nats_with_schedules: _Server) -> None:
    """A schedule message that no stream hears (no responders: not stored) is sent again until
    the publish deadline. On the 3-node cluster, right after a restart, the first schedule of a
    topic failed so at once ("JetStream did not answer"). Here the stream loses its schedule
    subjects behind the provider's back and gets them again 0.5 s later: the schedule is taken
    then, and both messages are delivered."""
    import asyncio

    async def run() -> None:
        topic = f"t-{uuid.uuid4().hex[:8]}"
        settings = {"stream_prefix": f"SCHED-{uuid.uuid4().hex[:8]}", "ack_wait": 2}
        async with msgbroker.connect(_nats_with_schedules.url, nats=settings) as broker:
            got: list[int] = []
            both = asyncio.Event()

            async def handler(ctx: msgbroker.MessageContext[_Numbered]) -> None:
                got.append(ctx.message.n)
                if len(got) == 2:
                    both.set()

            await broker.subscribe(topic, "g", handler, message_type=_Numbered)
            await broker.publish(topic, _Numbered(n=0), delay=0.2)  # gives the stream its schedule subjects
            transport = broker.transport
            assert isinstance(transport, NatsTransport)
            jsm = transport.jsm
            stream = transport.layout(topic).stream
            config = (await jsm.stream_info(stream)).config
            await jsm.update_stream(config.evolve(subjects=[s for s in config.subjects or [] if "~s" not in s]))

            async def give_back() -> None:
                await asyncio.sleep(0.5)
                await jsm.update_stream(config)

            restoring = asyncio.create_task(give_back())
            await broker.publish(topic, _Numbered(n=1), delay=0.3)
            await restoring
            await asyncio.wait_for(both.wait(), 20)
            assert sorted(got) == [0, 1]

    asyncio.run(run())
