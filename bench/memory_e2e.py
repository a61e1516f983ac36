"""Ordered publish + consume in one process on ``memory://NAME``: client CPU per message (issue #16,
deliverable 4).

One process publishes ``--messages`` messages with ``publish_batch`` (batches of 500, the messages
built inside the timed section: ~100 B bodies, 1,000 partition keys) to a topic of 64 partitions
while one ordered subscriber of the same process handles them; timed from the first batch to the
last message handled. Reported per run: process CPU µs per message (``time.process_time``: the
machine is shared, wall-clock rates say more about the other load than about us) and msg/s.

Interleaved comparison of two trees (e.g. HEAD's sources copied out with ``git archive``)::

    git archive HEAD core/src | tar -x -C /tmp/base
    .venv/bin/python bench/memory_e2e.py --runs 5 --compare /tmp/base/core/src core/src

Each run is a fresh process; the trees take turns (A B A B ...), and the medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid


def _one(messages: int, partitions: int, batch: int, keys: int) -> dict[str, float]:
    import msgbroker
    from msgbroker import Message
    from msgbroker.testing import eventually

    class Order(Message):
        key: str
        seq: int
        data: str

        @property
        def partition_key(self) -> str:
            return self.key

    names = [f"customer-{i:04d}" for i in range(keys)]
    data = "x" * 100  # a 100-byte payload, as the benchmark suite's 100 B cells

    async def main() -> dict[str, float]:
        broker = await msgbroker.connect(f"memory://e2e-{uuid.uuid4().hex[:8]}", partition_count=partitions)
        done = asyncio.Event()
        seen = 0
        last: dict[str, int] = {}

        async def handle(ctx: msgbroker.MessageContext[Order]) -> None:
            nonlocal seen
            message = ctx.message
            if last.get(message.key, -1) >= message.seq:
                raise AssertionError(f"out of order: {message.key} {message.seq}")
            last[message.key] = message.seq
            seen += 1
            if seen == messages:
                done.set()

        subscription = await broker.subscribe("orders", "e2e", handle, message_type=Order)
        await eventually(lambda: len(subscription.partitions) == partitions, 60)  # every lane open first
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for start in range(0, messages, batch):
            await broker.publish_batch(
                "orders", [Order(key=names[seq % keys], seq=seq, data=data)
                           for seq in range(start, min(messages, start + batch))])
        await asyncio.wait_for(done.wait(), 120)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await broker.close()
        return {"cpu_us_per_msg": cpu / messages * 1e6, "msg_per_s": messages / wall}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", nargs="+", metavar="SRC", help="source trees to put first on sys.path, in turn")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.messages, args.partitions, args.batch, args.keys)))
        return
    trees = args.compare or [""]
    results: dict[str, list[dict[str, float]]] = {t: [] for t in trees}
    for run in range(args.runs):
        for tree in trees:
            env = dict(os.environ)
            if tree:
                env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
            out = subprocess.run([sys.executable, __file__, "--one", "--messages", str(args.messages),
                                  "--partitions", str(args.partitions), "--batch", str(args.batch),
                                  "--keys", str(args.keys)], env=env, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[tree].append(result)
            print(f"run {run + 1} {tree or 'installed'}: {result['cpu_us_per_msg']:.2f} us/msg CPU, "
                  f"{result['msg_per_s']:,.0f} msg/s", flush=True)
    for tree, rs in results.items():
        cpu = sorted(r["cpu_us_per_msg"] for r in rs)
        rate = sorted(r["msg_per_s"] for r in rs)
        print(f"{tree or 'installed'}: CPU us/msg median {statistics.median(cpu):.2f} (best {cpu[0]:.2f}, "
              f"worst {cpu[-1]:.2f}); msg/s median {statistics.median(rate):,.0f} (best {rate[-1]:,.0f})")


if __name__ == "__main__":
    main()
