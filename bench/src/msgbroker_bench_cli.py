"""``msgbroker bench``: adds the benchmark harness to the msgbroker command (entry point group
``msgbroker.cli``, see docs/cli.md). A module of its own, outside the harness's package, so that
listing the msgbroker commands does not import the harness."""

from __future__ import annotations

import typer
from msgbroker.cli import PASS_THROUGH, CliError, run_argv


def bench(ctx: typer.Context) -> int:
    """The benchmark harness of bench/ (msgbroker-bench): arguments go to it; try --help."""
    try:
        import msgbroker_bench
    except ImportError as exc:
        raise CliError(f"the benchmark harness is not installed: cannot import msgbroker_bench ({exc})") from None
    return run_argv(msgbroker_bench.run, ctx.args)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command(context_settings=PASS_THROUGH, add_help_option=False)(bench)
