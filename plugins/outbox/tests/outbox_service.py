"""The service of the outbox's fault tests (test_faults.py), run with ``msgbroker run
outbox_service:service``: a seat-hold service in one process that

* writes, key after key, a hold row and its outbox message in one transaction (the writer);
* relays the outbox to the broker (``run_relay_in``);
* consumes the messages with the inbox: the effect row and the message id in one transaction,
  then a line in the record file (id, key, seq, attempt) for the fault suite's checker.

Everything survives a database or broker outage by trying again. Configured by environment:
OUTBOX_TEST_DATABASE, OUTBOX_TEST_PREFIX, OUTBOX_TEST_TOPIC, OUTBOX_TEST_RECORD,
OUTBOX_TEST_KEYS, OUTBOX_TEST_PER_KEY.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os

import msgbroker
from msgbroker import MessageContext
from msgbroker_outbox import Inbox, Outbox, async_url, run_relay_in
from sqlalchemy import Column, Integer, MetaData, String, Table, UniqueConstraint, func, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from tests.faults.model import FaultMessage

log = logging.getLogger("outbox_service")

PREFIX = os.environ["OUTBOX_TEST_PREFIX"]
TOPIC = os.environ["OUTBOX_TEST_TOPIC"]
RECORD = os.environ["OUTBOX_TEST_RECORD"]
KEYS = [f"key-{i}" for i in range(int(os.environ["OUTBOX_TEST_KEYS"]))]
PER_KEY = int(os.environ["OUTBOX_TEST_PER_KEY"])

engine = create_async_engine(async_url(os.environ["OUTBOX_TEST_DATABASE"]), pool_pre_ping=True)
sessions = async_sessionmaker(engine, expire_on_commit=False)
outbox = Outbox(prefix=PREFIX, buckets=16)
inbox = Inbox(prefix=PREFIX)
business = MetaData()
holds = Table(f"{PREFIX}_holds", business, Column("id", Integer, primary_key=True, autoincrement=True),
              Column("key", String(50), nullable=False), Column("seq", Integer, nullable=False),
              Column("message_id", String(64), nullable=False), UniqueConstraint("key", "seq"))
effects = Table(f"{PREFIX}_effects", business, Column("id", Integer, primary_key=True, autoincrement=True),
                Column("message_id", String(64), nullable=False), Column("key", String(50), nullable=False),
                Column("seq", Integer, nullable=False))

service = msgbroker.Service(title="outbox-faults", version="1")
writer: list[asyncio.Task[None]] = []


@service.on_startup
async def create_tables_and_write() -> None:
    for attempt in range(50):
        try:
            await outbox.create_tables(engine)
            await inbox.create_tables(engine)
            async with engine.begin() as conn:
                await conn.run_sync(business.create_all)
            break
        except Exception:
            if attempt == 49:
                raise
            await asyncio.sleep(0.2)
    writer.append(asyncio.create_task(write()))


@service.on_shutdown
async def stop_writing() -> None:
    for task in writer:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Polling only, every second: the relay trails the writer (a commit every 5 ms or more), so a kill
# finds commits not yet published.
run_relay_in(service, outbox, engine, lease_ttl=3.0, poll_interval=1.0, listen=False)


async def write_one(key: str) -> bool:
    """The next hold of ``key`` and its message in one transaction; False when the key is done."""
    async with sessions.begin() as session:
        seq = int(await session.scalar(select(func.count()).select_from(holds).where(holds.c.key == key)) or 0)
        if seq >= PER_KEY:
            return False
        message = FaultMessage(key=key, seq=seq)
        await session.execute(holds.insert().values(key=key, seq=seq, message_id=str(message.message_id)))
        await outbox.publish(session, TOPIC, message)
    return True


async def write() -> None:
    pending = list(KEYS)
    while pending:
        for key in list(pending):
            try:
                if not await write_one(key):
                    pending.remove(key)
            except Exception as exc:  # the database restarting: try again
                log.warning("writer: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.005)  # a steady stream: the relay (polling every second) trails it


record = open(RECORD, "a", buffering=1, encoding="utf-8")


@service.subscriber(TOPIC, "effects")
async def apply(ctx: MessageContext[FaultMessage]) -> None:
    m = ctx.message
    async with sessions.begin() as session:
        if await inbox.claim(session, "effects", m):
            await session.execute(effects.insert().values(message_id=str(m.message_id), key=m.key, seq=m.seq))
    record.write(json.dumps({"id": str(m.message_id), "key": m.key, "seq": m.seq, "attempt": ctx.delivery_attempt,
                             "pid": os.getpid()}) + "\n")
    record.flush()
