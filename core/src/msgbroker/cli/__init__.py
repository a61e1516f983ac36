"""The ``msgbroker`` command: publish, tail, pending counts, health, dead letters, metrics, demo
and benchmark — for an operator at 3 a.m. and for scripts (``--json``, exit codes). See docs/cli.md.

Every command takes the broker from ``--url`` (or ``MSGBROKER_URL``), ``--config FILE`` (or
``MSGBROKER_CONFIG``; JSON, TOML, YAML or the seed's appsettings.json) and the ``MSGBROKER_*``
environment of :class:`msgbroker.BrokerSettings`. Errors are one line on stderr and a non-zero
exit code, never a traceback.

One module per command group (``publish``, ``tail``, ``pending``, ``health``, ``dlq``,
``metrics``, ``demo``, ``bench``), each with a ``register(app)``; the shared ones they import
(``_target``: which broker; ``_render``: output; ``_options``, ``_errors``, ``_argv``) import no
command module; ``_app`` gathers the commands, ``_main`` runs them.
"""

from __future__ import annotations

from ._app import app
from ._errors import CliError
from ._main import main
from .publish import JsonMessage

__all__ = ["CliError", "JsonMessage", "app", "main"]
