"""``msgbroker dashboard``: serve the web dashboard over one broker (docs/dashboard.md)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from typing import Annotated

import typer

from .._codec import validate_name
from .._errors import InvalidNameError
from ._errors import CliError
from ._loop import run_async
from ._options import ConfigOption, PartitionsOption, UrlOption
from ._target import Target, close_bounded, describe, open_broker

WatchOption = Annotated[
    list[str] | None,
    typer.Option("--watch", "-w", help="TOPIC:GROUP to show (repeatable); without it, every group the "
                 "provider lists (memory, Redis, NATS)."),
]


def parse_watch(items: list[str] | None) -> list[tuple[str, str]]:
    """``TOPIC:GROUP`` items as (topic, group), each name checked."""
    pairs = []
    for item in items or ():
        topic, sep, group = item.partition(":")
        if not sep:
            raise CliError(f"--watch {item!r}: write TOPIC:GROUP", exit_code=2)
        try:
            pairs.append((validate_name("topic", topic), validate_name("group", group)))
        except InvalidNameError as exc:
            raise CliError(f"--watch {item!r}: {exc}", exit_code=2) from None
    return pairs


def dashboard(
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    watch: WatchOption = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless you give a token).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: a free one).")] = 8765,
    allow_changes: Annotated[bool, typer.Option("--allow-changes", help="Allow replaying and purging dead "
                                                "letters from the page (read-only without it).")] = False,
    token: Annotated[str | None, typer.Option("--token", envvar="MSGBROKER_DASHBOARD_TOKEN",
                                              help="Access token the page's URL must carry (?token=...); "
                                              "required off loopback.")] = None,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between two readings.")] = 1.0,
) -> int:
    """Serve a web page with the groups, partitions, owners, rates and dead letters of the broker."""
    try:
        import uvicorn

        from ..dashboard import DashboardConfig, create_app, is_loopback
    except ImportError as exc:
        raise CliError(f"the dashboard needs Starlette and uvicorn ({exc.name} is missing): "
                       "pip install 'msgbroker[dashboard]'") from None
    pairs = parse_watch(watch)
    if not is_loopback(host) and not token:
        raise CliError(f"--host {host!r} is not loopback: give --token (or MSGBROKER_DASHBOARD_TOKEN) so that "
                       "only those who have it can read the page", exit_code=2)
    if token is not None and len(token) < 16:
        raise CliError("--token is shorter than 16 characters: use a long random one", exit_code=2)
    target = Target(url, config, partition_count)

    async def session() -> int:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        broker = await open_broker(target)
        try:
            settings = DashboardConfig(watch=pairs, allow_changes=allow_changes, token=token, host=host,
                                       interval=interval, where=describe(broker))
            app = create_app(broker, settings)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn sets a flag, no event
                await asyncio.sleep(0.05)
            if server.started:
                bound = sock.getsockname()[1]
                shown = f"[{host}]" if ":" in host else host
                mode = "replay and purge allowed" if allow_changes else "read-only"
                sys.stdout.write(f"dashboard: http://{shown}:{bound}/ ({mode}"
                                 + ("; open it with ?token=..." if token else "") + ")\n")
                sys.stdout.flush()
            await serving
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            await close_bounded(broker)
        return 0

    return run_async(session())


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` to ``app``."""
    app.command()(dashboard)
