"""A worker *process* for the fault tests: joins a group and records every handling.

Each handling appends one JSON line (id, key, seq, attempt, partition, pid) to the record file
and flushes it *before* the message is acked, so the record is at-least-once like the delivery.
Run: python -m tests.faults.worker URL TOPIC GROUP RECORD_FILE [--settings JSON] [--hang-seq N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import msgbroker
from msgbroker import MessageContext

from .model import FaultMessage


async def run(args: argparse.Namespace) -> None:
    overrides = json.loads(args.settings) if args.settings else {}
    # One file shared by all workers, opened O_APPEND: each line is one write(), so the file
    # order is the global order of handlings across processes.
    record = open(args.record, "a", buffering=1, encoding="utf-8")  # noqa: ASYNC230 - once at start; closed at exit
    pid = os.getpid()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def handle(ctx: MessageContext[FaultMessage]) -> None:
        message = ctx.message
        if args.hang_seq is not None and message.seq == args.hang_seq and ctx.delivery_attempt == 1:
            async with asyncio.timeout(args.handler_timeout):
                await asyncio.sleep(3600)  # a handler that hangs: the timeout ends it, the message is retried
        record.write(json.dumps({"id": str(message.message_id), "key": message.key, "seq": message.seq,
                                 "attempt": ctx.delivery_attempt, "partition": ctx.partition, "pid": pid}) + "\n")
        record.flush()
        if args.work:
            await asyncio.sleep(args.work)

    async with msgbroker.connect(args.url, **overrides) as broker:
        await broker.subscribe(args.topic, args.group, handle)
        print("ready", flush=True)
        sys.stdout.close()
        await stop.wait()
    record.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("topic")
    parser.add_argument("group")
    parser.add_argument("record")
    parser.add_argument("--settings", default="")
    parser.add_argument("--hang-seq", type=int, default=None)
    parser.add_argument("--handler-timeout", type=float, default=1.0)
    parser.add_argument("--work", type=float, default=0.0, help="seconds each handling takes")
    try:
        asyncio.run(run(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
