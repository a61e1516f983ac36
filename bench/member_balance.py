"""Members joining: time until a group's assignment is balanced (issue #26, deliverable 4).

N worker processes subscribe to one topic of 256 partitions at the same moment; each reports
the partitions it reads (``Subscription.partitions``) every 50 ms on its stdout. The run is
*balanced* when every partition is read by exactly one worker and the workers' counts differ by
at most one (what the engine's lease assignment and Kafka's assignors aim at). Reported: the
time from the last worker's subscribe returning to the first balanced report, and from the
processes' start. Bounded: a run gives up after ``--limit`` seconds.

    set -a; . .brokers/env; set +a
    .venv/bin/python bench/member_balance.py --url "$MSGBROKER_REDIS__URL" --workers 1 4 16

Settings as for ``msgbroker.connect`` (the provider's defaults unless ``--set key=value``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

WORKER = r"""
import asyncio, json, sys, time
import msgbroker

async def main(url, topic, partitions, settings):
    broker = await msgbroker.connect(url, partition_count=partitions, **settings)
    async def handle(ctx):
        pass
    subscription = await broker.subscribe(topic, "balance", handle)
    print(json.dumps({"member": subscription.member_id, "joined": time.time()}), flush=True)
    try:
        while True:
            print(json.dumps({"member": subscription.member_id, "partitions": subscription.partitions,
                              "at": time.time()}), flush=True)
            await asyncio.sleep(0.05)
    finally:
        await broker.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])))
"""


def balanced(latest: dict[str, list[int]], partitions: int) -> bool:
    held = [p for ps in latest.values() for p in ps]
    if len(held) != partitions or set(held) != set(range(partitions)):
        return False
    counts = [len(ps) for ps in latest.values()]
    return max(counts) - min(counts) <= 1


async def run(url: str, workers: int, partitions: int, settings: dict[str, object], limit: float) -> dict[str, object]:
    topic = f"balance-{uuid.uuid4().hex[:8]}"
    started = time.time()
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, url, topic, str(partitions), json.dumps(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL) for _ in range(workers)]
    joined: dict[str, float] = {}
    latest: dict[str, list[int]] = {}
    done = asyncio.Event()
    result: dict[str, object] = {"workers": workers, "partitions": partitions}

    async def read(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            report = json.loads(line)
            if "joined" in report:
                joined[report["member"]] = report["joined"]
                continue
            latest[report["member"]] = report["partitions"]
            if len(joined) == workers and not done.is_set() and balanced(latest, partitions):
                last_join = max(joined.values())
                result.update(after_last_join=round(report["at"] - last_join, 2),
                              after_start=round(report["at"] - started, 2),
                              loads=sorted(len(ps) for ps in latest.values()))
                done.set()

    readers = [asyncio.create_task(read(p)) for p in procs]
    try:
        await asyncio.wait_for(done.wait(), limit)
    except TimeoutError:
        result.update(after_last_join=None, note=f"not balanced within {limit:.0f}s",
                      loads=sorted(len(ps) for ps in latest.values()))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--partitions", type=int, default=256)
    parser.add_argument("--limit", type=float, default=120.0, help="give up after this many seconds per run")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a provider setting, e.g. redis.claim_timeout=8")
    args = parser.parse_args()
    settings: dict[str, dict[str, object]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        settings.setdefault(section, {})[name] = value
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for workers in args.workers:
        result = asyncio.run(run(args.url, workers, args.partitions, dict(settings), args.limit))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
