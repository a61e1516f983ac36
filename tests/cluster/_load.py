"""Worker processes handling a stream of messages on a 3-node cluster while a node fails: what
``test_cluster_redis.py`` and ``test_cluster_nats.py`` share. The worker process, the record of
every publish confirmation and handling, and the checker are the fault suite's
(``tests/faults/worker.py``, ``tests/faults/model.py``); each run's figures go to the same
``.brokers/fault-results.jsonl`` (``python -m tests.faults.report`` prints them), under the
provider name ``<provider>-cluster``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgbroker
from msgbroker.testing import eventually

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the fault suite as its worker processes import it (python -m tests.faults.worker)
    sys.path.insert(0, str(ROOT))

from tests.faults.model import FaultMessage, RecordTail, Verdict, check, read_records  # noqa: E402
from tests.faults.test_faults import Pool, messages, publish  # noqa: E402

__all__ = ["ROOT", "ClusterPool", "Load", "RecordTail", "settle", "wait_for_handling"]


class ClusterPool(Pool):
    """The fault suite's worker pool, pointed at a cluster: its own URL and settings."""

    def __init__(self, name: str, url: str, settings: dict[str, Any], topic: str, record: Path) -> None:
        self.provider, self.topic, self.group, self.record = name, topic, "workers", record
        self.url = url
        self.settings = json.dumps(settings)
        self.procs: list[Any] = []
        self.kills = 0
        self.slow_stops = 0

    def stop_all(self) -> None:
        """The fault suite's stop (SIGTERM, SIGKILL after 30 s), then every process reaped (a
        killed one too, so no process outlives its Popen object)."""
        procs = list(self.procs)
        started = time.monotonic()
        super().stop_all()
        for proc in procs:
            if proc.poll() is None:
                self.slow_stops += 1
                proc.wait(10)
        if self.slow_stops:
            log = self.record.with_suffix(".log")
            print(f"{self.provider}: {self.slow_stops} worker(s) did not stop within 30 s of SIGTERM "
                  f"({time.monotonic() - started:.1f}s); their log ends:\n"
                  + (log.read_text()[-3000:] if log.exists() else "(no log)"))


class Load:
    """A publisher: a batch of ``size`` messages every ``interval`` seconds until stopped; a batch
    that fails transiently is published again (a duplicate if it was stored, never a loss)."""

    def __init__(self, broker: msgbroker.Broker, topic: str, size: int = 20, interval: float = 0.05) -> None:
        self.broker, self.topic, self.size, self.interval = broker, topic, size, interval
        self.sent: list[FaultMessage] = []
        self.confirmed: list[tuple[float, float, str]] = []
        """Per batch: when its publish began and when it was confirmed (monotonic), its first id."""
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            batch = messages(self.size, start=len(self.sent))
            began = time.monotonic()
            await publish(self.broker, self.topic, batch, self.sent)
            self.confirmed.append((began, time.monotonic(), str(batch[0].message_id)))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def gap(self) -> float:
        """The longest time between two confirmed batches (how long publishing stalled)."""
        times = [t for _, t, _ in self.confirmed]
        return round(max((b - a for a, b in itertools.pairwise(times)), default=0.0), 1)

    async def recovery(self, tail: RecordTail, since: float, timeout: float) -> float:
        """Seconds from ``since`` until the first batch published after it has been handled."""

        def handled() -> bool:
            after = [mid for began, _, mid in self.confirmed if began > since]
            return bool(after) and after[0] in tail.read()

        await eventually(handled, timeout=timeout, interval=0.1, what="a message published after the fault handled")
        return round(time.monotonic() - since, 1)


async def wait_for_handling(tail: RecordTail, count: int, timeout: float = 60) -> None:
    """Until ``count`` messages were handled (the workers are up and reading)."""
    await eventually(lambda: len(tail.read()) >= count, timeout=timeout, interval=0.1,
                     what=f"{count} messages handled")


async def settle(broker: msgbroker.Broker, pool: ClusterPool, sent: list[FaultMessage], scenario: str, *,
                 no_loss: bool, timeout: float = 120, **figures: Any) -> Verdict:
    """Wait until everything was handled (``no_loss``) or, where losing confirmed messages is
    possible, until nothing is pending and no handling came for 5 s; then check the record,
    append the figures to ``.brokers/fault-results.jsonl`` and assert what is guaranteed: no
    order violation, nothing unexpected, pending back to 0, and with ``no_loss`` nothing lost."""
    wanted = {str(m.message_id) for m in sent}
    tail = RecordTail(pool.record)

    async def quiet() -> bool:
        try:
            return await broker.pending_count(pool.topic, pool.group) == 0
        except msgbroker.MsgBrokerError:
            return False

    if no_loss:
        try:
            await eventually(lambda: wanted <= tail.read(), timeout=timeout, interval=0.2,
                             what=f"{scenario}: every message handled")
        except AssertionError:
            log = pool.record.with_suffix(".log")
            print(log.read_text()[-5000:] if log.exists() else "no worker log")
            raise
    else:
        seen = {"count": -1, "at": time.monotonic()}

        async def done() -> bool:
            count = len(tail.read())
            if count != seen["count"]:
                seen["count"], seen["at"] = count, time.monotonic()
            return wanted <= tail.ids or (time.monotonic() - seen["at"] > 5 and await quiet())

        await eventually(done, timeout=timeout, interval=0.2, what=f"{scenario}: handling settled")
    await eventually(quiet, timeout=60, interval=0.2, what=f"{scenario}: pending count back to 0")
    verdict = check(sent, read_records(pool.record))
    result = {"provider": pool.provider, "scenario": scenario, "kills": pool.kills, **figures,
              "published": verdict.published, "handled": verdict.handled, "lost": len(verdict.lost),
              "duplicates": verdict.duplicates, "redelivered": verdict.redelivered,
              "order_violations": len(verdict.order_violations), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    (ROOT / ".brokers").mkdir(exist_ok=True)
    with (ROOT / ".brokers" / "fault-results.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(result) + "\n")
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"{pool.provider} {scenario}: {verdict.summary()} {extra}")
    assert not verdict.order_violations, verdict.order_violations[:5]
    assert not verdict.unexpected, verdict.unexpected[:5]
    if no_loss:
        assert not verdict.lost, f"lost {len(verdict.lost)}: {verdict.lost[:5]}"
    return verdict
