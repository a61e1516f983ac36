"""``msgbroker run module:service``: run a :class:`msgbroker.Service` as a worker until SIGTERM or
SIGINT, then drain (in-flight handlers finish and settle, the groups are left) and exit 0.
``--workers N`` starts N worker processes under a supervisor that passes the signal on and
restarts a worker that died; ``--http PORT`` serves ``/health`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .._broker import Broker
from .._errors import MsgBrokerError
from .._service import Service
from ._errors import CliError
from ._options import ConfigOption, PartitionsOption, UrlOption
from ._probe import Probe
from ._render import err
from ._service_target import load_service, service_broker
from ._target import Target, close_bounded, describe

log = logging.getLogger("msgbroker.run")


class LogLevel(StrEnum):
    """``--log-level``: the ``logging`` levels (msgbroker logs retries at info, dead letters at warning)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _note(text: str) -> None:
    err().print(f"msgbroker run: {text}", markup=False)


async def _open(broker: Broker) -> None:
    timeout = float(os.environ.get("MSGBROKER_CONNECT_TIMEOUT", "10"))
    try:
        await asyncio.wait_for(broker.open(), timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await broker.abort()
        raise CliError(f"cannot reach the {broker.provider} broker at {describe(broker)} within {timeout:g}s") from None
    except MsgBrokerError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot connect to the {broker.provider} broker at {describe(broker)}: {exc}") from exc


async def serve(service: Service, broker: Broker, worker: int, http: int | None, http_host: str,
                ready_file: Path | None = None) -> int:
    """One worker: start the service on ``broker``, wait for SIGTERM/SIGINT, drain, close.
    A second signal while draining drops everything at once (exit 1). ``ready_file`` gets the
    pid once the service runs (the supervisor tells a failed start from a later death by it)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1 and draining is not None:
            draining.cancel()

    draining: asyncio.Task[None] | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    probe = Probe(service, worker) if http is not None else None
    server: asyncio.Server | None = None
    try:
        if probe is not None and http is not None:  # first: a port in use fails before anything started
            try:
                server = await probe.serve(http_host, http)
            except OSError as exc:
                raise CliError(f"cannot serve --http on {http_host}:{http}: {exc.strerror or exc}") from exc
            port = server.sockets[0].getsockname()[1]  # --http 0: a free port
            _note(f"worker {worker}: http://{http_host}:{port}/health and /metrics")
        await _open(broker)
        try:
            await service.start(broker)
        except Exception as exc:  # a startup hook's error too: one line, exit 1
            await close_bounded(broker)
            text = str(exc) if isinstance(exc, MsgBrokerError | OSError) else f"{type(exc).__name__}: {exc}"
            raise CliError(f"starting the service failed: {text}") from exc
        for sub in service.subscriptions:
            log.info("%s as %s: member %s, partitions %s", sub.topic, sub.group, sub.member_id, sub.partitions)
        if ready_file is not None:
            _write(ready_file, str(os.getpid()))
        _note(f"worker {worker} (pid {os.getpid()}) running {len(service.subscribers)} subscriber(s) on "
              f"{describe(broker)}")
        await stop.wait()
        _note(f"worker {worker}: stopping, draining in-flight messages")
        if probe is not None:
            probe.draining = True
        draining = asyncio.create_task(service.stop())
        if signals > 1:
            draining.cancel()
        grace = broker.settings.shutdown_timeout.total_seconds() + 10
        try:
            await asyncio.wait_for(asyncio.shield(draining), grace)
        except (asyncio.CancelledError, TimeoutError):
            draining.cancel()
            with contextlib.suppress(BaseException):
                await draining
            _note(f"worker {worker}: not drained (second signal or over {grace:g}s); dropped the connection")
            await broker.abort()
            return 1
        await close_bounded(broker)
        _note(f"worker {worker}: stopped")
        return 0
    finally:
        if server is not None:
            server.close()
        if probe is not None:
            probe.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _write(path: Path, text: str) -> None:
    path.write_text(text)  # a few bytes on a local disk, once


def _worker_argv(spec: str, index: int, url: str | None, config: object, partition_count: int | None,
                 http: int | None, http_host: str, ready: Path) -> list[str]:
    argv = [sys.executable, "-m", "msgbroker.cli", "run", spec, "--worker-index", str(index),
            "--ready-file", str(ready / str(index))]
    if url is not None:
        argv += ["--url", url]
    if config is not None:
        argv += ["--config", str(config)]
    if partition_count is not None:
        argv += ["--partition-count", str(partition_count)]
    if http is not None:
        argv += ["--http", str(http + index if http else 0), "--http-host", http_host]  # 0: each a free port
    return argv


def supervise(argvs: list[list[str]], ready: Path) -> int:
    """Run one process per argv; SIGTERM/SIGINT go to every worker (a second one too: they drop
    what they hold); a worker that dies is started again, unless it died before its service ran
    (``ready/<index>`` holds its pid once it does): a bad setting or an unreachable broker fails
    every worker alike, so the supervisor stops them all."""

    def became_ready(index: int, pid: int) -> bool:
        try:
            return (ready / str(index)).read_text() == str(pid)
        except OSError:
            return False

    stopping = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping += 1
        for proc in procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM if stopping == 1 else signal.SIGINT)

    procs: dict[int, subprocess.Popen[bytes]] = {}
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    codes: dict[int, int] = {}
    try:
        for index, argv in enumerate(argvs):
            # a session of its own: a terminal's Ctrl-C reaches the supervisor only, which passes it on once
            procs[index] = subprocess.Popen(argv, start_new_session=True)
        _note(f"supervisor (pid {os.getpid()}): {len(procs)} workers, pids "
              f"{' '.join(str(p.pid) for p in procs.values())}")
        while len(codes) < len(procs):
            time.sleep(0.1)
            for index, proc in procs.items():
                if index in codes:
                    continue
                code = proc.poll()
                if code is None:
                    continue
                if stopping:
                    codes[index] = code
                    continue
                if not became_ready(index, proc.pid):
                    _note(f"worker {index} failed at startup (exit {code}); stopping the others")
                    codes[index] = code
                    on_signal(signal.SIGTERM, None)
                    continue
                _note(f"worker {index} (pid {proc.pid}) exited with {code}; starting it again")
                procs[index] = subprocess.Popen(argvs[index], start_new_session=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    worst = max(codes.values(), default=0)
    return worst if worst >= 0 else 1  # a worker killed by a signal: -N


def run_command(
    service_spec: Annotated[
        str, typer.Argument(metavar="MODULE:SERVICE", help="The msgbroker.Service to run, as module:attribute.")
    ],
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes.")] = 1,
    http: Annotated[
        int | None,
        typer.Option("--http", min=0, max=65535,
                     help="Serve GET /health and /metrics on this port (worker i of --workers N: PORT+i)."),
    ] = None,
    http_host: Annotated[str, typer.Option("--http-host", help="Address for --http.")] = "127.0.0.1",
    log_level: Annotated[
        LogLevel, typer.Option("--log-level", help="Log records of this level and above go to stderr.")
    ] = LogLevel.WARNING,
    worker_index: Annotated[int, typer.Option("--worker-index", hidden=True)] = 0,
    ready_file: Annotated[Path | None, typer.Option("--ready-file", hidden=True)] = None,
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
) -> int:
    """Run a service's subscribers until SIGTERM/SIGINT, then drain and leave the groups.

    The broker: --url / --config (or MSGBROKER_URL / MSGBROKER_CONFIG and the MSGBROKER_* settings),
    else the service's own. A second signal stops at once, leaving unsettled messages to be
    delivered again.
    """
    service = load_service(service_spec)
    target = Target(url, config, partition_count)
    broker = service_broker(service, target)  # a bad URL or file fails here, before any worker starts
    if not service.subscribers:
        _note(f"the service {service.title!r} declares no subscriber")
    if workers > 1:
        if broker.provider == "memory":
            _note(f"memory:// lives in one process: each of the {workers} workers has a broker of its own and "
                  "sees only what it publishes itself (several processes share sqlite:///PATH or a server)")
        if http is not None and http + workers - 1 > 65535:
            raise CliError(f"--http {http} with {workers} workers needs ports up to {http + workers - 1}", 2)
        with tempfile.TemporaryDirectory(prefix="msgbroker-run-") as ready:
            argvs = [[*_worker_argv(service_spec, i, url, config, partition_count, http, http_host, Path(ready)),
                      "--log-level", log_level.value] for i in range(workers)]
            return supervise(argvs, Path(ready))
    logging.basicConfig(level=log_level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(service, broker, worker_index, http, http_host, ready_file))


def register(app: typer.Typer) -> None:
    """Add ``run`` to ``app``."""
    app.command("run")(run_command)
