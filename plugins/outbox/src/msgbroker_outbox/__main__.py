"""``python -m msgbroker_outbox relay``: a relay on its own, until SIGTERM or SIGINT (docs/outbox.md)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import msgbroker
from sqlalchemy.ext.asyncio import create_async_engine

from ._outbox import Outbox, async_url
from ._relay import Relay


def parser_for() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m msgbroker_outbox",
                                     description="The transactional outbox's relay (docs/outbox.md).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("relay", help="move committed outbox messages to the broker until SIGTERM/SIGINT")
    p.add_argument("--database", "-d", required=True,
                   help="the outbox's database: postgresql://... or sqlite:///PATH (SQLAlchemy URLs too)")
    p.add_argument("--url", "-u", default=None,
                   help="the broker (else MSGBROKER_URL / MSGBROKER_CONFIG / MSGBROKER_* as for msgbroker)")
    p.add_argument("--prefix", default="msgbroker", help="the outbox tables' prefix (default msgbroker)")
    p.add_argument("--buckets", type=int, default=64, help="the outbox's buckets (default 64; as its writers)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--lease-ttl", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds (default 0.1)")
    p.add_argument("--keep-sent", type=float, default=3600.0, help="seconds sent messages are kept (default 3600)")
    p.add_argument("--no-listen", action="store_true",
                   help="PostgreSQL: poll only, without LISTEN for the commits' notifications")
    p.add_argument("--create-tables", action="store_true", help="create the outbox tables when missing")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    return parser


async def relay(args: argparse.Namespace) -> int:
    outbox = Outbox(prefix=args.prefix, buckets=args.buckets)
    engine = create_async_engine(async_url(args.database), pool_pre_ping=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.create_tables:
            await outbox.create_tables(engine)
        async with msgbroker.connect(args.url) as broker:
            worker = Relay(outbox, engine, broker, batch_size=args.batch_size, lease_ttl=args.lease_ttl,
                           poll_interval=args.poll_interval, keep_sent=args.keep_sent, listen=not args.no_listen)
            async with worker:
                print(f"msgbroker_outbox: relay {worker.relay_id} running on the {broker.provider} broker",
                      file=sys.stderr, flush=True)
                await stop.wait()
                print("msgbroker_outbox: stopping, handing the buckets back", file=sys.stderr, flush=True)
            print(f"msgbroker_outbox: stopped ({worker.moved} messages moved)", file=sys.stderr, flush=True)
    finally:
        await engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser_for().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(relay(args))
    except msgbroker.MsgBrokerError as exc:
        print(f"msgbroker_outbox: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
