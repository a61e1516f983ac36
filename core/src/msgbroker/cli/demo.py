"""``msgbroker demo``: the seat-lock demo of :mod:`msgbroker.demo`, its arguments passed through."""

from __future__ import annotations

import typer

from ._argv import PASS_THROUGH, run_argv


def demo(ctx: typer.Context) -> int:
    """The seat-lock demo (arguments go to python -m msgbroker.demo; try --help)."""
    from .. import demo as demo_module

    return run_argv(demo_module.main, ctx.args)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to ``app``."""
    app.command(context_settings=PASS_THROUGH, add_help_option=False)(demo)
