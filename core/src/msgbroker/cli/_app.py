"""The ``msgbroker`` command with its built-in commands; ``main()`` adds the plugins' to a copy."""

from __future__ import annotations

import typer

from . import asyncapi, dashboard, demo, dlq, health, metrics, pending, publish, run, tail

BUILT_IN = (
    publish.register,
    tail.register,
    pending.register,
    health.register,
    metrics.register,
    demo.register,
    dlq.register,
    run.register,
    asyncapi.register,
    dashboard.register,
)
"""Each adds its commands to the app it is given, as a plugin's register function does."""


def built_in_app() -> typer.Typer:
    """A new ``msgbroker`` app with the built-in commands."""
    app = typer.Typer(
        name="msgbroker",
        help="Operate msgbroker: publish, tail, pending counts, health, dead letters, metrics.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for register in BUILT_IN:
        register(app)
    return app


app = built_in_app()
