"""The acceptance run of issue 19 on a real Redis server, as a user gets it: the wheels of
scripts/wheels installed (``msgbroker[redis]``, no network) into a new venv, that venv's ``msgbroker
run ticket_service:service --workers 2``, SIGTERM while requests stream in, started again: every
request handled, none out of order within its session and area. A checker in this process reads
the ``seat-locked`` announcements the handler publishes in handling order (same key, same
partition, in order)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path

import msgbroker
import pytest
from msgbroker import BrokerSettings, MessageContext
from ticket_service import SeatLock, SeatLocked

from tests.distributions.venvs import ROOT, build_wheels, clean_env, install_from_wheels, run, third_party_view

EXAMPLE = Path(__file__).resolve().parents[1]
KEYS = 24
PER_KEY = 100
WORK_SECONDS = 0.01


def redis_url() -> str:
    url = os.environ.get("MSGBROKER_REDIS__URL")
    if not url:
        pytest.fail("MSGBROKER_REDIS__URL is not set: run `scripts/brokers up redis` and "
                    "`set -a; . .brokers/env; set +a` (scripts/test does both)")
    return url


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``msgbroker`` command of a new venv with ``msgbroker[redis]`` from the wheels alone."""
    wheels = build_wheels(tmp_path_factory.mktemp("dist"))
    view = third_party_view(tmp_path_factory.mktemp("deps") / "site")
    venv = tmp_path_factory.mktemp("user") / "venv"
    python = install_from_wheels(venv, view, wheels, "msgbroker[redis]")
    where = json.loads(run(python, "-c", (
        "import json, importlib.metadata as md, msgbroker, msgbroker_redis\n"
        "print(json.dumps({'files': [msgbroker.__file__, msgbroker_redis.__file__],\n"
        "  'dists': sorted(d.metadata['Name'] for d in md.distributions()\n"
        "                  if d.metadata['Name'].startswith('msgbroker'))}))"
    )))
    assert all(Path(f).is_relative_to(venv) for f in where["files"]), where  # the wheels, not the repository
    assert where["dists"] == ["msgbroker", "msgbroker-redis"]
    command = venv / "bin" / "msgbroker"  # the new venv's command, not the repository's .venv/bin/msgbroker
    assert command.is_file() and not command.resolve().is_relative_to(ROOT), command
    return command


class Workers:
    """``msgbroker run`` with 2 worker processes, its stderr in a file."""

    def __init__(self, command: Path, settings: Path, log: Path) -> None:
        self.log = log
        env = clean_env()  # nothing of the repository's .venv (PYTHONPATH, VIRTUAL_ENV) or settings
        env["TICKETS_WORK_SECONDS"] = str(WORK_SECONDS)
        with log.open("a") as err:
            self.proc = subprocess.Popen([str(command), "run", "ticket_service:service", "--workers", "2",
                                          "--config", str(settings)], cwd=EXAMPLE, env=env, stderr=err,
                                         stdout=subprocess.DEVNULL)

    def text(self) -> str:
        return self.log.read_text()

    async def running(self, starts: int) -> None:
        deadline = time.monotonic() + 60
        while self.text().count("running 1 subscriber(s) on redis://") < starts:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """After a failure: SIGTERM (the supervisor passes it on), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def stop(self) -> tuple[int, float]:
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        while self.proc.poll() is None:
            assert time.monotonic() - began < 60, self.text()
            await asyncio.sleep(0.05)
        return self.proc.returncode, time.monotonic() - began


async def test_two_workers_stopped_mid_stream_and_restarted_lose_nothing_and_keep_order(
        installed: Path, tmp_path: Path) -> None:
    prefix = f"tickets-{uuid.uuid4().hex[:10]}"
    config = {"provider": "redis", "partition_count": 16, "retry_delay": 0.2,
              "redis": {"url": redis_url(), "key_prefix": prefix}}
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(config))
    settings = BrokerSettings.from_file(settings_file)
    sessions = [(f"session-{k // 4}", f"area-{k % 4}") for k in range(KEYS)]
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    workers_seen: list[set[int]] = [set(), set()]
    phase = 0

    async def check(ctx: MessageContext[SeatLocked]) -> None:
        locked = ctx.message
        seen[(locked.session, locked.area)].append(locked.seq)
        workers_seen[phase].add(locked.worker)

    def handled() -> int:
        return sum(len(v) for v in seen.values())

    async def stream(first: int, last: int, pause: float) -> None:
        for seq in range(first, last):
            await broker.publish_batch("seat-lock-requests", [
                SeatLock(session=s, area=a, seq=seq, seats=[f"{a}-{seq}"]) for s, a in sessions])
            await asyncio.sleep(pause)

    started: list[Workers] = []
    try:
        async with msgbroker.connect(settings) as broker:
            await broker.subscribe("seat-locked", "checker", check)
            await stream(0, PER_KEY // 2, 0)  # queued before the workers start
            log = tmp_path / "run.log"
            first = Workers(installed, settings_file, log)
            started.append(first)
            await first.running(2)
            publishing = asyncio.create_task(stream(PER_KEY // 2, PER_KEY, 0.05))  # more arrives while they work
            deadline = time.monotonic() + 60
            # mid-stream, once both workers have their share (the second to join takes over partitions)
            while handled() < KEYS * PER_KEY // 3 or len(workers_seen[0]) < 2:
                assert time.monotonic() < deadline, first.text()
                await asyncio.sleep(0.02)
            code, drain_seconds = await first.stop()  # mid-stream
            at_stop = handled()
            assert code == 0, first.text()
            assert first.text().count("stopped") == 2, first.text()  # each worker drained and left its groups
            assert at_stop < KEYS * PER_KEY, "the stream ended before the SIGTERM: nothing was tested"
            phase = 1
            second = Workers(installed, settings_file, log)
            started.append(second)
            await second.running(4)
            await publishing
            deadline = time.monotonic() + 90
            while not all(set(seen[key]) == set(range(PER_KEY)) for key in sessions):
                assert time.monotonic() < deadline, (handled(), second.text())
                await asyncio.sleep(0.05)
            assert await broker.pending_count("seat-lock-requests", "seat-lockers") == 0
            code, _ = await second.stop()
            assert code == 0, second.text()
            assert await broker.dead_letters("seat-lock-requests", "seat-lockers") == []
    finally:
        for workers in started:
            workers.close()
    everything = set(range(PER_KEY))
    lost = {key: sorted(everything - set(seqs)) for key, seqs in seen.items() if set(seqs) != everything}
    out_of_order = {key: seqs for key, seqs in seen.items() if seqs != sorted(seqs)}
    duplicates = sum(len(seqs) - len(set(seqs)) for seqs in seen.values())
    print(f"\nhandled {handled()} ({KEYS} keys x {PER_KEY}); {at_stop} by the first run (SIGTERM, drained in "
          f"{drain_seconds:.2f}s); duplicates {duplicates}; workers per run {[len(w) for w in workers_seen]}")
    assert lost == {}
    assert out_of_order == {}
    assert duplicates == 0  # a drained worker settles what it handled: nothing is handled twice
    assert len(workers_seen[0]) == 2  # both processes of the first run took a share
