"""``msgbroker health``: exit 0 when the broker answers, 1 when it does not (for probes)."""

from __future__ import annotations

import typer

from ._errors import CliError
from ._loop import run_async
from ._options import ConfigOption, JsonOption, PartitionsOption, UrlOption
from ._render import emit_json, out
from ._target import Target, describe, open_broker


def health(
    url: UrlOption = None,
    config: ConfigOption = None,
    partition_count: PartitionsOption = None,
    json_output: JsonOption = False,
) -> int:
    """Exit 0 when the broker answers, 1 when it does not (for probes)."""
    target = Target(url, config, partition_count)
    broker = target.broker()  # a bad URL or settings file is an error, not an unhealthy broker
    where = describe(broker)

    async def probe() -> tuple[bool, str | None]:
        try:
            opened = await open_broker(target)
        except CliError as exc:
            return False, str(exc)
        try:
            ok = await opened.is_healthy()
            return ok, None if ok else "the server did not answer"
        finally:
            await opened.close()

    healthy, error = run_async(probe())
    if json_output:
        emit_json({"healthy": healthy, "provider": broker.provider, "url": where, "error": error})
    elif healthy:
        out().print(f"healthy: {broker.provider} at {where}", markup=False)
    else:
        out().print(f"unhealthy: {error}", markup=False)
    return 0 if healthy else 1


def register(app: typer.Typer) -> None:
    """Add ``health`` to ``app``."""
    app.command()(health)
