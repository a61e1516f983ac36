"""The ``msgbroker`` command: publish, tail, pending counts, health, dead letters, metrics and demo
— for an operator at 3 a.m. and for scripts (``--json``, exit codes) — plus the commands other
installed distributions add (``bench``, for one). See docs/cli.md.

Every command takes the broker from ``--url`` (or ``MSGBROKER_URL``), ``--config FILE`` (or
``MSGBROKER_CONFIG``; JSON, TOML, YAML or the seed's appsettings.json) and the ``MSGBROKER_*``
environment of :class:`msgbroker.BrokerSettings`. Errors are one line on stderr and a non-zero
exit code, never a traceback.

One module per command group (``publish``, ``tail``, ``pending``, ``health``, ``dlq``,
``metrics``, ``demo``), each with a ``register(app)``; the shared ones they import (``_target``:
which broker; ``_render``: output; ``_options``, ``_errors``, ``_argv``) import no command module;
``_app`` gathers the built-in commands, ``_plugins`` finds the others, ``_main`` runs them
(``main``, and ``main_async`` for async code: ``_loop`` says where their coroutines run).
"""

from __future__ import annotations

from ._app import app
from ._argv import PASS_THROUGH, run_argv
from ._errors import CliError
from ._main import main, main_async
from ._plugins import ENTRY_POINT_GROUP
from .publish import JsonMessage

__all__ = ["ENTRY_POINT_GROUP", "PASS_THROUGH", "CliError", "JsonMessage", "app", "main", "main_async", "run_argv"]
