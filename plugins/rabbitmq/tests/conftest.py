"""Fixtures of the RabbitMQ provider's own tests: the real server, member processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


@pytest.fixture
def amqp_url() -> str:
    """The server started by ``scripts/brokers up rabbitmq`` (never skipped when missing)."""
    url = os.environ.get("MSGBROKER_RABBITMQ__URL")
    if not url:
        pytest.fail("MSGBROKER_RABBITMQ__URL is not set: run `scripts/brokers up rabbitmq` and "
                    "`set -a; . .brokers/env; set +a` (or use scripts/test)")
    return url


@pytest.fixture
def prefix() -> str:
    """An exchange prefix of its own for each test."""
    return f"rmqtest-{uuid.uuid4().hex[:8]}"


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what() if callable(what) else what}")
        await asyncio.sleep(0.02)


@dataclass(eq=False)
class MemberProcess:
    """A member (tests/_member.py) running in a child process, and what it reported."""

    process: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def partitions(self) -> list[int]:
        shares = [e["partitions"] for e in self.events if e["event"] == "partitions"]
        return shares[-1] if shares else []

    def handled(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "handled"]

    def started(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "started"]

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def kill(self) -> None:
        """SIGKILL: no close, no settle, the socket just goes away."""
        self.process.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


@pytest.fixture
async def members(amqp_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start member processes: ``await members(prefix, topic, group, partitions, handle_seconds)``."""
    started: list[MemberProcess] = []

    async def start(prefix: str, topic: str, group: str, partitions: int, handle_seconds: float = 0.0,
                    claim_timeout: float | None = 2.0) -> MemberProcess:
        """``claim_timeout=None``: the provider's default."""
        env = {**os.environ, "MEMBER_CLAIM_TIMEOUT": "default" if claim_timeout is None else str(claim_timeout)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "_member.py"), amqp_url, prefix, topic, group, str(partitions),
            str(handle_seconds),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )
        member = MemberProcess(process)
        member.reader = asyncio.create_task(member._read())
        started.append(member)
        await _wait_for(lambda: any(e["event"] == "ready" for e in member.events) or process.returncode is not None,
                       60, "a member process to subscribe")
        assert process.returncode is None, f"member process exited with {process.returncode}"
        return member

    yield start
    await asyncio.gather(*(m.close() for m in started), return_exceptions=True)


async def _restart_rabbitmq() -> None:
    """``scripts/brokers restart rabbitmq``: stops the server and starts it again (durable state kept)."""
    process = await asyncio.create_subprocess_exec(
        str(REPO / "scripts" / "brokers"), "restart", "rabbitmq",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"scripts/brokers restart rabbitmq failed: {output.decode()[-2000:]}")


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``await wait_for(condition, timeout, what)``: a bounded wait that fails saying ``what``."""
    return _wait_for


@pytest.fixture
def restart_rabbitmq() -> Callable[[], Any]:
    """``await restart_rabbitmq()``: restart the server through scripts/brokers."""
    return _restart_rabbitmq
