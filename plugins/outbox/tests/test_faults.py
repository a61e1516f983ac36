"""The outbox's fault scenarios (issue #24) on the real PostgreSQL and Redis, checked by the fault
suite's checker (tests/faults/model.py): lost 0, per-key order violations 0, and through the
inbox no effect applied twice.

* relays run on their own (``python -m msgbroker_outbox relay``), one killed with SIGKILL while
  they move a backlog;
* a service under ``msgbroker run`` (outbox_service.py: writer, relay and inbox consumer in one
  process) killed with SIGKILL while committed messages wait to be relayed, started again; then
  PostgreSQL restarted (``scripts/brokers restart postgres``), then the broker restarted — for
  Redis and NATS a server of the test's own, so that no other test's server goes away; RabbitMQ
  and Kafka the shared one (``scripts/brokers restart``), as the fault suite does.

The figures go to .brokers/fault-results.jsonl like the fault suite's (``python -m
tests.faults.report``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgbroker
import pytest
from msgbroker import MessageContext
from msgbroker.testing import eventually
from msgbroker_outbox import Outbox, async_url
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.faults.model import FaultMessage, Verdict, check, read_records

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def record_result(provider: str, scenario: str, verdict: Verdict, **figures: Any) -> None:
    result = {"provider": provider, "scenario": scenario, **figures, "published": verdict.published,
              "handled": verdict.handled, "lost": len(verdict.lost), "duplicates": verdict.duplicates,
              "redelivered": verdict.redelivered, "order_violations": len(verdict.order_violations),
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    (ROOT / ".brokers").mkdir(exist_ok=True)
    with (ROOT / ".brokers" / "fault-results.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")
    print(f"{provider} {scenario}: {verdict.summary()} {figures}")


# provider -> (environment variable with its address, URL template, the consumer's settings for a
# quick failover), as in the fault suite (tests/faults/test_faults.py)
PROVIDERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "redis": ("MSGBROKER_REDIS__URL", "{}", {"redis": {"claim_timeout": 2}}),
    "nats": ("MSGBROKER_NATS__URL", "{}", {"nats": {"ack_wait": 2}}),
    "rabbitmq": ("MSGBROKER_RABBITMQ__URL", "{}", {}),
    "kafka": ("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "kafka://{}", {"kafka": {"session_timeout": 6,
                                                                           "heartbeat_interval": 1}}),
}


def installed(name: str) -> bool:
    try:
        msgbroker.registry.by_name(name)
    except msgbroker.ProviderNotFoundError:
        return False
    return True


def provider_url(name: str) -> str:
    variable, template, _ = PROVIDERS[name]
    value = os.environ.get(variable, "").strip()
    if not value:
        pytest.fail(f"{variable} is not set: run `scripts/brokers up {name}` and load .brokers/env "
                    "(scripts/test does both)", pytrace=False)
    return template.format(value)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A broker server of this test alone, restartable without touching anyone else's: a
    redis-server (append-only file, fsync always) or a nats-server with JetStream (file store)."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.folder, self.port = kind, folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"{kind}://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        binary = shutil.which(f"{self.kind}-server")
        assert binary, f"{self.kind}-server is missing: run `scripts/brokers up {self.kind}` (it installs it)"
        if self.kind == "redis":
            return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                    "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"]
        return [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.folder / "jetstream")]

    def start(self) -> None:
        self.folder.mkdir(exist_ok=True)
        log_path = self.folder / "server.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None and time.monotonic() < deadline, (
                f"{self.kind}-server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class SharedServer:
    """The server of ``scripts/brokers up`` (RabbitMQ, Kafka: a JVM or an Erlang node of the
    test's own would take the two cores' memory and a minute to start), restarted with
    ``scripts/brokers restart``, as the fault suite does; the test's names are its own."""

    def __init__(self, kind: str) -> None:
        self.kind, self.url = kind, provider_url(kind)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def restart(self) -> None:
        _brokers("restart", self.kind)
        _brokers("wait", self.kind)


@pytest.fixture
async def pg(prefix: str, postgres_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(async_url(postgres_url), pool_pre_ping=True)
    try:
        yield made
    finally:
        async with made.begin() as conn:
            names = [r[0] for r in await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE tablename LIKE :p"), {"p": f"{prefix}%"})]
            for name in names:
                await conn.execute(text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))
            await conn.execute(text(f"DROP FUNCTION IF EXISTS {prefix}_outbox_notify()"))
        await made.dispose()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(("provider", "database"), [
    *(pytest.param(n, "postgres", id=f"{n}-postgres") for n in PROVIDERS if installed(n)),
    pytest.param("redis", "sqlite", id="redis-sqlite"),
])
async def test_a_relay_killed_mid_batch_loses_nothing_and_keeps_each_keys_order(
        provider: str, database: str, pg: AsyncEngine, prefix: str, tmp_path: Path, postgres_url: str) -> None:
    """Two relays move a backlog of 1,500 messages (20 keys) in batches of 5; one is killed with
    SIGKILL once a fifth is relayed, while messages are still unsent; a third starts and takes
    the dead one's buckets over when their leases run out (1 s)."""
    url = provider_url(provider)
    db_url = postgres_url if database == "postgres" else f"sqlite:///{tmp_path / 'outbox.db'}"
    if database == "sqlite":
        pg = create_async_engine(async_url(db_url))
    outbox = Outbox(prefix=prefix, buckets=16)
    await outbox.create_tables(pg)
    topic = f"outbox-{uuid.uuid4().hex[:8]}"
    sent = [FaultMessage(key=f"key-{i % 20}", seq=i // 20) for i in range(1500)]
    async with pg.begin() as conn:
        for start in range(0, len(sent), 100):
            await outbox.publish_batch(conn, topic, sent[start:start + 100])
    records: list[dict[str, object]] = []

    async def handle(ctx: MessageContext[FaultMessage]) -> None:
        m = ctx.message
        records.append({"id": str(m.message_id), "key": m.key, "seq": m.seq, "attempt": ctx.delivery_attempt})

    def relay(name: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "msgbroker_outbox", "relay", "--database", db_url, "--url", url,
                 "--prefix", prefix, "--buckets", "16", "--batch-size", "5", "--lease-ttl", "1"],
                env=child_env(MSGBROKER_PARTITION_COUNT="16"), stdout=log, stderr=subprocess.STDOUT)

    relays: list[subprocess.Popen[bytes]] = []
    async def relayed_a_fifth() -> bool:
        return await outbox.unsent(pg) <= 1200

    async with msgbroker.connect(url, partition_count=16, **PROVIDERS[provider][2]) as broker:
        await broker.subscribe(topic, "g", handle)
        try:
            relays = [relay("relay-1"), relay("relay-2")]
            await eventually(relayed_a_fifth, timeout=60, what="a fifth relayed", interval=0.005)
            relays[0].kill()  # SIGKILL while both move the backlog: its bucket leases run out
            relays[0].wait(10)
            unsent_at_kill = await outbox.unsent(pg)
            assert unsent_at_kill > 0, "the relays had moved everything before the kill"
            relays.append(relay("relay-3"))
            wanted = {str(m.message_id) for m in sent}
            await eventually(lambda: wanted <= {str(r["id"]) for r in records}, timeout=60,
                             what="every message relayed and handled")
        finally:
            for proc in relays:
                stop(proc)
        logs = "".join((tmp_path / f"relay-{i}.log").read_text() for i in (1, 2, 3))
    assert await outbox.unsent(pg) == 0
    if database == "sqlite":
        await pg.dispose()
    verdict = check(sent, records)
    record_result(f"{provider}+{database} (outbox)", "relay kill -9 mid-batch", verdict, kills=1,
                  unsent_at_kill=unsent_at_kill)
    assert not verdict.lost, (verdict.summary(), logs[-3000:])
    assert not verdict.order_violations, verdict.order_violations[:5]
    assert not verdict.unexpected


@pytest.mark.parametrize("provider", [pytest.param(n, id=n) for n in PROVIDERS if installed(n)])
async def test_service_killed_between_commit_and_publish_then_postgres_and_broker_restarts(
        provider: str, pg: AsyncEngine, prefix: str, tmp_path: Path, postgres_url: str) -> None:
    server: PrivateServer | SharedServer = (
        PrivateServer(provider, tmp_path / provider) if provider in ("redis", "nats") else SharedServer(provider))
    server.start()
    try:
        await service_scenario(provider, server, pg, prefix, tmp_path, postgres_url)
    finally:
        server.stop()


async def service_scenario(provider: str, server: PrivateServer | SharedServer, pg: AsyncEngine, prefix: str,
                           tmp_path: Path, postgres_url: str) -> None:
    keys, per_key = 8, 30
    total = keys * per_key
    record = tmp_path / "handled.jsonl"
    env = child_env(
        OUTBOX_TEST_DATABASE=postgres_url, OUTBOX_TEST_PREFIX=prefix, OUTBOX_TEST_TOPIC=f"holds-{prefix}",
        OUTBOX_TEST_RECORD=str(record), OUTBOX_TEST_KEYS=str(keys), OUTBOX_TEST_PER_KEY=str(per_key),
        MSGBROKER_PARTITION_COUNT="16", MSGBROKER_RETRY_DELAY="0.1", MSGBROKER_MAX_RETRY_ATTEMPTS="300",
        MSGBROKER_REDIS__CLAIM_TIMEOUT="2", MSGBROKER_NATS__ACK_WAIT="1",
        MSGBROKER_KAFKA__SESSION_TIMEOUT="6", MSGBROKER_KAFKA__HEARTBEAT_INTERVAL="1")
    log_path = tmp_path / "service.log"

    def service() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "msgbroker.cli", "run", "outbox_service:service",
                                     "--url", server.url], cwd=HERE, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)

    async def holds() -> int:
        try:
            async with pg.connect() as conn:
                return int(await conn.scalar(text(f'SELECT count(*) FROM "{prefix}_holds"')) or 0)
        except Exception:
            return 0

    outbox = Outbox(prefix=prefix, buckets=16)
    t0 = time.monotonic()

    def phase(what: str) -> None:
        print(f"outbox faults: {what} at {time.monotonic() - t0:.1f} s", flush=True)

    proc = service()
    try:
        await eventually(lambda: _at_least(holds, total // 4), timeout=60, what="a quarter of the holds written")
        kills = 0
        for _ in range(3):  # the relay may catch up between the check and the kill: then once more
            await eventually(lambda: _unsent_at_least(pg, outbox, 5), timeout=30,
                             what="committed messages waiting for the relay", interval=0.005)
            phase("kill -9 of the service")
            proc.kill()  # SIGKILL: writer, relay and consumer die; committed rows wait in the outbox
            proc.wait(10)
            kills += 1
            unsent_at_kill = await outbox.unsent(pg)
            proc = service()
            if unsent_at_kill:
                break
        assert unsent_at_kill > 0, "each kill came after the relay had caught up: no commit waited for its publish"
        await eventually(lambda: _at_least(holds, total // 2), timeout=60, what="half of the holds written")
        phase("restart of PostgreSQL")
        _brokers("restart", "postgres")
        await eventually(lambda: _at_least(holds, 3 * total // 4), timeout=60,
                         what="three quarters written after the PostgreSQL restart")
        phase(f"restart of {provider}")
        server.restart()
        await eventually(lambda: _at_least(holds, total), timeout=90, what="every hold written")
        async with pg.connect() as conn:
            rows = (await conn.execute(text(f'SELECT key, seq, message_id FROM "{prefix}_holds" ORDER BY key, seq'))
                    ).all()
        phase("every hold written")
        wanted = {str(r.message_id) for r in rows}
        await eventually(lambda: wanted <= {str(r["id"]) for r in read_records(record)}, timeout=90,
                         what="every committed hold's message handled")
        phase("every message handled")
    finally:
        stop(proc)
    sent = [FaultMessage(message_id=uuid.UUID(r.message_id), key=r.key, seq=r.seq) for r in rows]
    verdict = check(sent, read_records(record))
    async with pg.connect() as conn:
        effects = (await conn.execute(text(
            f'SELECT message_id, count(*) AS n FROM "{prefix}_effects" GROUP BY message_id'))).all()
    twice = [r.message_id for r in effects if r.n != 1]
    record_result(f"{provider}+postgres (outbox)", "service kill -9 after commit, postgres restart, broker restart",
                  verdict, kills=kills, restarts=2, unsent_at_kill=unsent_at_kill,
                  effects=sum(r.n for r in effects), effects_twice=len(twice))
    log = log_path.read_text()
    assert len(sent) == total
    assert not verdict.lost, (verdict.summary(), log[-3000:])
    assert not verdict.order_violations, verdict.order_violations[:5]
    assert not verdict.unexpected
    assert not twice and {r.message_id for r in effects} == wanted, "an effect applied twice or not at all"


async def _at_least(count: Any, wanted: int) -> bool:
    return bool(await count() >= wanted)


async def _unsent_at_least(engine: AsyncEngine, outbox: Outbox, wanted: int) -> bool:
    try:
        return await outbox.unsent(engine) >= wanted
    except Exception:
        return False


def _brokers(*args: str) -> None:
    out = subprocess.run([str(ROOT / "scripts" / "brokers"), *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, f"scripts/brokers {' '.join(args)} failed: {out.stderr[-2000:]}"
