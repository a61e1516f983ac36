"""Cells and their variants: what is measured, one repetition at a time, with bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
from array import array
from dataclasses import dataclass, field
from typing import Any

from ._driver import Consumers, Driver, Unsupported
from ._model import Sink, payload
from ._stats import percentiles

__all__ = ["Cell", "E2EVariant", "PublishVariant", "Variant", "run_cell"]

FIELDS = [
    "provider", "workload", "cell", "variant", "kind", "label", "rep", "payload", "partitions", "workers",
    "ordered", "messages", "seconds", "msgs_per_s", "mb_per_s", "cpu_us_per_msg", "broker_cpu_pct",
    "p50_ms", "p99_ms", "p999_ms", "max_ms", "offered_rate", "dups", "order_violations", "first_ms", "status",
    "config", "run_at",
]


class BrokerCpu:
    """CPU seconds of the broker server's process (psutil, pid from ``.brokers/<name>/pid``)."""

    def __init__(self, pid: int | None) -> None:
        self.process: Any = None
        if pid:
            with contextlib.suppress(Exception):
                import psutil  # type: ignore[import-untyped]

                self.process = psutil.Process(pid)
                self.process.cpu_times()

    def seconds(self) -> float | None:
        if self.process is None:
            return None
        try:
            times = self.process.cpu_times()
            return float(times.user + times.system)
        except Exception:
            return None


class Variant:
    """One system's way of doing a cell's work."""

    name = ""
    driver: Driver
    broken: str | None = None

    async def setup(self) -> None:
        await self.driver.open()

    async def rep(self, run: int) -> dict[str, Any]:
        raise NotImplementedError

    async def teardown(self) -> None:
        await self.driver.close()


class PublishVariant(Variant):
    """Publish ``messages`` of ``size`` bytes: one await per message (``single``, each call
    timed), ``callers`` tasks doing that at once (``concurrent``), or in batches."""

    def __init__(
        self, name: str, driver: Driver, mode: str, messages: int, size: int, batch: int, callers: int = 1
    ) -> None:
        self.name = name
        self.driver = driver
        self.mode = mode
        self.messages = messages
        self.size = size
        self.batch = batch
        self.callers = callers
        self.topic = f"bench-pub-{uuid.uuid4().hex[:8]}"

    async def setup(self) -> None:
        await self.driver.open()
        await self.driver.prepare(self.topic, 64)
        # warm-up: connections, topic creation, code paths (not measured)
        data = payload(self.size)
        if self.mode in ("single", "concurrent"):
            await self.driver.publish_single(self.topic, range(20), 0, data)
            # and every partition once, so that no repetition pays for a partition's first use
            # (RabbitMQ declares a partition's backlog queue when its first message arrives)
            await self.driver.publish_batch(self.topic, range(200), 0, data, time.perf_counter_ns())
        elif self.mode == "prebuilt":
            await self.driver.publish_built(  # type: ignore[attr-defined]
                self.topic, self.driver.build_batches(range(200), 0, data, 200)[0]  # type: ignore[attr-defined]
            )
        else:  # enough keys to touch every partition once
            await self.driver.publish_batch(self.topic, range(200), 0, data, time.perf_counter_ns())

    async def rep(self, run: int) -> dict[str, Any]:
        data = payload(self.size)
        n = self.messages
        t0 = time.perf_counter()
        c0 = time.process_time()
        took = array("q")
        if self.mode in ("single", "concurrent"):
            # ``callers`` tasks, each awaiting one publish at a time; every call timed
            publish, clock, topic = self.driver.publish_single, time.perf_counter_ns, self.topic

            async def caller(seqs: range) -> None:
                for seq in seqs:
                    start = clock()
                    await publish(topic, range(seq, seq + 1), run, data)
                    took.append(clock() - start)

            if self.callers == 1:
                await caller(range(n))
            else:
                await asyncio.gather(*(caller(range(i, n, self.callers)) for i in range(self.callers)))
        elif self.mode == "prebuilt":
            # messages built before the clock starts: what the provider and codec cost alone
            batches = self.driver.build_batches(range(n), run, data, self.batch)  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            c0 = time.process_time()
            for batch in batches:
                await self.driver.publish_built(self.topic, batch)  # type: ignore[attr-defined]
        else:
            for start in range(0, n, self.batch):
                await self.driver.publish_batch(
                    self.topic, range(start, min(n, start + self.batch)), run, data, time.perf_counter_ns()
                )
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        out: dict[str, Any] = {"messages": n, "seconds": seconds, "cpu": cpu}
        if took:
            p50, p99, p999, pmax = percentiles(took, (50, 99, 99.9, 100))
            out.update(p50_ms=p50 / 1e6, p99_ms=p99 / 1e6, p999_ms=p999 / 1e6, max_ms=pmax / 1e6)
        return out

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.driver.drop(self.topic)
        await self.driver.close()


class E2EVariant(Variant):
    """Publish and consume at once: ``workers`` members of one group ack each message; the
    publisher keeps at most ``window`` messages ahead of the handlers (closed loop), or, with
    ``rate``, publishes open loop at that rate and latency counts from the intended send time,
    or, with ``gap``, publishes one message at a time (one ``publish()``) and sleeps ``gap``
    seconds after each: a steady low rate, latency counted from just before the publish call."""

    def __init__(
        self,
        name: str,
        driver: Driver,
        *,
        messages: int,
        size: int,
        workers: int,
        partitions: int,
        ordered: bool,
        window: int = 2000,
        batch: int = 100,
        rate: float | None = None,
        gap: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.driver = driver
        self.messages = messages
        self.size = size
        self.workers = workers
        self.partitions = partitions
        self.ordered = ordered
        self.window = window
        self.batch = batch
        self.rate = rate
        self.gap = gap
        self.timeout = timeout
        self.topic = f"bench-e2e-{uuid.uuid4().hex[:8]}"
        self.sink: Sink | None = None
        self.consumers: Consumers | None = None

    async def setup(self) -> None:
        await self.driver.open()
        await self.driver.prepare(self.topic, self.partitions)
        self.sink = Sink()
        self.consumers = await self.driver.start_consumers(
            self.topic, f"bench-g-{uuid.uuid4().hex[:8]}", self.workers, self.partitions, self.sink, self.ordered
        )
        # warm-up: joins, assignment, first fetches (not measured); a failure here fails the variant
        warm = await self._drive(0, min(500, max(50, self.messages // 10)), closed_loop=True)
        if warm["status"] != "ok":
            raise RuntimeError(f"warm-up: {warm['status']}")

    async def rep(self, run: int) -> dict[str, Any]:
        return await self._drive(run, self.messages, closed_loop=self.rate is None and self.gap is None)

    async def _drive(self, run: int, n: int, closed_loop: bool) -> dict[str, Any]:
        sink = self.sink
        assert sink is not None
        sink.arm(run, n, self.partitions)
        data = payload(self.size)
        publish = self.driver.publish_many
        deadline = time.monotonic() + self.timeout
        t0 = time.perf_counter()
        c0 = time.process_time()
        status = "ok"
        published = 0
        try:
            if closed_loop:
                window = self.window
                while published < n:
                    if published - sink.count > window:
                        sink.resume_at = published - window // 2
                        sink.progress.clear()
                        if sink.count < sink.resume_at:
                            await asyncio.wait_for(sink.progress.wait(), max(0.0, deadline - time.monotonic()))
                    end = min(n, published + self.batch)
                    await publish(self.topic, range(published, end), run, data, time.perf_counter_ns())
                    published = end
            elif self.gap is not None:
                single = self.driver.publish_single
                while published < n:
                    await single(self.topic, range(published, published + 1), run, data)
                    published += 1
                    await asyncio.sleep(self.gap)
                    if time.monotonic() > deadline:
                        raise TimeoutError
            else:
                assert self.rate is not None
                interval = 1e9 / self.rate
                start_ns = time.perf_counter_ns()
                while published < n:
                    now = time.perf_counter_ns()
                    due = min(n, int((now - start_ns) / interval) + 1)
                    if due > published:
                        intended = int(start_ns + published * interval)
                        await publish(self.topic, range(published, due), run, data, intended)
                        published = due
                    else:
                        await asyncio.sleep((start_ns + published * interval - now) / 1e9)
                    if time.monotonic() > deadline:
                        raise TimeoutError
            sink.resume_at = n
            await asyncio.wait_for(sink.done.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # still making progress: slow, not lost (a second more tells which)
            before = sink.count
            await asyncio.sleep(1.0)
            what = "too slow" if sink.count > before else "lost"
            status = f"{what}: {before} of {n} handled ({published} published) within {self.timeout:.0f}s"
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        p50, p99, p999, pmax = percentiles(sink.latencies, (50, 99, 99.9, 100))
        return {
            "messages": sink.count,
            "seconds": seconds,
            "cpu": cpu,
            "p50_ms": p50 / 1e6,
            "p99_ms": p99 / 1e6,
            "p999_ms": p999 / 1e6,
            "max_ms": pmax / 1e6,
            "dups": sink.dups,
            "order_violations": sink.order_violations,
            "status": status,
        }

    async def teardown(self) -> None:
        if self.consumers is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumers.close(), 30)
        with contextlib.suppress(Exception):
            await self.driver.drop(self.topic)
        await self.driver.close()


@dataclass
class Cell:
    """One row group of the table: the same work done by several variants."""

    provider: str
    workload: str
    name: str
    params: dict[str, Any]
    variants: list[Variant] = field(default_factory=list)
    skipped: list[tuple[str, str, str, str]] = field(default_factory=list)
    """(variant name, kind, label, reason) of variants that cannot do this work."""


async def run_cell(
    cell: Cell, reps: int, broker_cpu: BrokerCpu, rep_timeout: float, log: Any, deadline: float = math.inf
) -> list[dict[str, Any]]:
    """Set every variant up, run the repetitions interleaved (A B C A B C …), tear down. After
    ``deadline`` (monotonic) no further repetition starts (the run's time budget)."""
    rows: list[dict[str, Any]] = []
    base = {"provider": cell.provider, "workload": cell.workload, "cell": cell.name, **cell.params}

    def row(variant_name: str, kind: str, label: str, config: str, rep: int | str, **values: Any) -> dict[str, Any]:
        out = {**base, "variant": variant_name, "kind": kind, "label": label, "rep": rep, "config": config}
        out.update(values)
        return out

    for name, kind, label, reason in cell.skipped:
        rows.append(row(name, kind, label, "", "-", status=f"n/a: {reason}"))
    live: list[Variant] = []

    async def set_up(variant: Variant) -> None:
        d = variant.driver
        try:
            t0 = time.monotonic()
            # a variant's own deadline may be longer (the drain cell starts worker processes)
            await asyncio.wait_for(variant.setup(), max(rep_timeout, getattr(variant, "timeout", 0.0)) + 20)
            live.append(variant)
            log(f"  {cell.provider:8} {cell.name:28} {variant.name:16} ready in {time.monotonic() - t0:.1f}s")
        except Unsupported as exc:
            rows.append(row(variant.name, d.kind, d.label, d.config, "-", status=f"n/a: {exc}"))
            await _quiet_teardown(variant)
        except Exception as exc:
            rows.append(row(variant.name, d.kind, d.label, d.config, "-", status=f"failed: setup: {_short(exc)}"))
            log(f"  {cell.provider} {cell.name} {variant.name}: setup failed: {_short(exc)}")
            await _quiet_teardown(variant)

    # set-ups only wait for the servers (joins, assignment, topic creation): run them together
    await asyncio.gather(*(set_up(v) for v in cell.variants))
    live.sort(key=cell.variants.index)
    gc.collect()  # every cell starts from the same collector state, outside the timed sections
    for rep in range(1, reps + 1):
        if time.monotonic() > deadline and rep > 1:
            log(f"  {cell.provider} {cell.name}: time budget spent, {rep - 1} repetition(s) only")
            break
        for variant in live:
            d = variant.driver
            if variant.broken:
                continue
            cpu0 = broker_cpu.seconds()
            try:
                # a variant's own deadline may be longer (the paced latency cell on many partitions)
                bound = max(rep_timeout, getattr(variant, "timeout", 0.0)) + 10
                result = await asyncio.wait_for(variant.rep(rep), bound)
            except Unsupported as exc:
                variant.broken = f"n/a: {exc}"
                rows.append(row(variant.name, d.kind, d.label, d.config, rep, status=variant.broken))
                continue
            except Exception as exc:
                variant.broken = f"failed: {_short(exc)}"
                rows.append(row(variant.name, d.kind, d.label, d.config, rep, status=variant.broken))
                log(f"  {cell.provider} {cell.name} {variant.name} rep {rep}: {variant.broken}")
                continue
            cpu1 = broker_cpu.seconds()
            seconds = result.pop("seconds")
            cpu = result.pop("cpu", None)
            messages = result["messages"]
            status = result.pop("status", "ok")
            if status != "ok":
                variant.broken = status
            rate = messages / seconds if seconds > 0 and status == "ok" else math.nan
            size = cell.params.get("payload", 0)
            values: dict[str, Any] = {
                "seconds": round(seconds, 4),
                "msgs_per_s": round(rate, 1),
                "mb_per_s": round(rate * size / 1e6, 3) if size else "",
                "cpu_us_per_msg": round(cpu / messages * 1e6, 2) if cpu is not None and messages else "",
                "broker_cpu_pct": round((cpu1 - cpu0) / seconds * 100, 1) if cpu0 is not None and cpu1 is not None
                and seconds > 0 else "",
                "status": status,
            }
            for key, value in result.items():
                values[key] = round(value, 3) if isinstance(value, float) and math.isfinite(value) else value
            rows.append(row(variant.name, d.kind, d.label, d.config, rep, **values))
            log(f"  {cell.provider:8} {cell.name:28} {variant.name:16} rep {rep}: "
                f"{rate:>10,.0f} msg/s  {status if status != 'ok' else ''}")
    await asyncio.gather(*(_quiet_teardown(v) for v in live))
    return rows


async def _quiet_teardown(variant: Variant) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(variant.teardown(), 120)  # RabbitMQ: deleting a topic's queues takes a while


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:200]
