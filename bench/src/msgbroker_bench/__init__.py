"""msgbroker-bench: msgbroker measured side by side with the raw client libraries, FastStream and
the brokers' own tools, on every provider whose server is up (see docs/benchmarks.md).

``run(argv)`` is the entry point (``msgbroker bench``, ``python -m msgbroker_bench``,
``scripts/bench``); ``BrokerCpu`` and ``broker_pid`` serve the standalone scripts beside the
package (``bench/*.py``) that measure a broker server's CPU, and ``Seat`` is their message."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from ._cells import BrokerCpu
from ._common import PROVIDERS
from ._model import Seat
from ._run import broker_pid, parse_args

__all__ = ["PROVIDERS", "BrokerCpu", "Seat", "broker_pid", "main", "run"]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (``--help`` lists them); returns
    the exit status. Writes docs/benchmarks/results.csv, docs/benchmarks.md and its plots."""
    from ._run import main_async

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    # the clients' retry chatter (NotLeaderForPartition on fresh topics, rebalances) is not ours
    # to show; failures surface as cell statuses
    for name in ("aiokafka", "aio_pika", "aiormq", "nats", "msgbroker", "faststream"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return asyncio.run(main_async(args, _log))


def main() -> None:
    """Console entry point."""
    raise SystemExit(run(sys.argv[1:]))
