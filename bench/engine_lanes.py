"""The core engine's cost against the partitions a member holds: client CPU per message on
``memory://`` with one ordered member holding 64 or 1,024 partitions.

Two loads, each in a fresh process with the member's lanes all open before the clock starts:

* ``paced``: one ``publish()`` every ``--interval`` seconds (a steady low rate: nearly every lane
  idle at every read-loop iteration, which is where a cost per lane held shows);
* ``drain``: ``publish_batch`` of 500 messages (100 B, 1,000 keys) as fast as the member handles
  them, to ``--drain`` messages.

Reported: process CPU µs per message (``time.process_time``: publisher and member share the process;
the machine is shared, so CPU, not wall clock). With ``--compare`` the source trees take turns
(A B A B ...) and the medians are printed, e.g. HEAD against the working tree::

    git archive HEAD core/src | tar -x -C /tmp/base
    .venv/bin/python bench/engine_lanes.py --runs 3 --compare /tmp/base/core/src core/src
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


def _one(load: str, partitions: int, messages: int, interval: float) -> dict[str, float]:
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

    names = [f"customer-{i:04d}" for i in range(1_000)]
    data = "x" * 100

    async def main() -> dict[str, float]:
        broker = await msgbroker.connect(f"memory://lanes-{uuid.uuid4().hex[:8]}", partition_count=partitions)
        done = asyncio.Event()
        seen = 0

        async def handle(ctx: msgbroker.MessageContext[Order]) -> None:
            nonlocal seen
            seen += 1
            if seen == messages:
                done.set()

        subscription = await broker.subscribe("orders", "lanes", handle, message_type=Order)
        await eventually(lambda: len(subscription.partitions) == partitions, 60)
        await asyncio.sleep(0.2)  # the read loop settles into its wait
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if load == "paced":
            for seq in range(messages):
                await broker.publish("orders", Order(key=names[seq % 1_000], seq=seq, data=data))
                await asyncio.sleep(interval)
        else:
            for start in range(0, messages, 500):
                await broker.publish_batch("orders", [Order(key=names[seq % 1_000], seq=seq, data=data)
                                                      for seq in range(start, min(messages, start + 500))])
        await asyncio.wait_for(done.wait(), 120)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        await broker.close()
        return {"cpu_us_per_msg": cpu / messages * 1e6, "wall_s": wall}

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--paced", type=int, default=1_000, help="messages of the paced load")
    parser.add_argument("--interval", type=float, default=0.002, help="seconds between the paced publishes")
    parser.add_argument("--drain", type=int, default=20_000, help="messages of the drain load")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", nargs="+", metavar="SRC", help="source trees to put first on sys.path, in turn")
    parser.add_argument("--one", nargs=2, metavar=("LOAD", "PARTITIONS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        load, partitions = args.one[0], int(args.one[1])
        count = args.paced if load == "paced" else args.drain
        print(json.dumps(_one(load, partitions, count, args.interval)))
        return
    trees = args.compare or [""]
    results: dict[tuple[str, str, int], list[float]] = {}
    for run in range(args.runs):
        for load in ("paced", "drain"):
            for partitions in args.partitions:
                for tree in trees:
                    env = dict(os.environ)
                    if tree:
                        env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", load, str(partitions), "--paced", str(args.paced),
                         "--interval", str(args.interval), "--drain", str(args.drain)],
                        env=env, check=True, capture_output=True, text=True)
                    cpu = json.loads(out.stdout.strip().splitlines()[-1])["cpu_us_per_msg"]
                    results.setdefault((load, tree, partitions), []).append(cpu)
                    print(f"run {run + 1} {load} {partitions} partitions {tree or 'installed'}: {cpu:.1f} us/msg CPU",
                          flush=True)
    print("\nmedian CPU us per message (best-worst)")
    for (load, tree, partitions), cpus in results.items():
        cpus.sort()
        print(f"{load:5} {partitions:5} partitions {tree or 'installed'}: {statistics.median(cpus):.1f} "
              f"({cpus[0]:.1f}-{cpus[-1]:.1f})")


if __name__ == "__main__":
    main()
