"""``msgbroker bench``: the benchmark harness of bench/ (msgbroker-bench), when installed."""

from __future__ import annotations

import typer

from ._argv import PASS_THROUGH, run_argv
from ._errors import CliError


def bench(ctx: typer.Context) -> int:
    """The benchmark harness of bench/ (msgbroker-bench), when installed (arguments go to it; try --help)."""
    try:
        import msgbroker_bench  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CliError(
            "the benchmark harness is not installed: it is msgbroker-bench in the repository's bench/ "
            "folder (pip install -e bench, or run scripts/bench)"
        ) from None
    return run_argv(msgbroker_bench.run, ctx.args)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app``."""
    app.command(context_settings=PASS_THROUGH, add_help_option=False)(bench)
