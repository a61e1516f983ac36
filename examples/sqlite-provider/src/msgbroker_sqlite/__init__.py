"""msgbroker-sqlite: a worked example of a msgbroker provider — a broker in one SQLite file.

Installed, it registers the ``sqlite://`` scheme through the entry-point group
``msgbroker.providers`` (this module is the pluggy plugin)::

    async with msgbroker.connect("sqlite:///var/tmp/broker.db", partition_count=8) as broker:
        ...

See docs/writing-a-provider.md for how it was built, step by step.
"""

from __future__ import annotations

from msgbroker.spi import Transport, hookimpl

from ._transport import SqliteSettings, SqliteTransport

__version__ = "0.1.0"

__all__ = ["SqliteSettings", "SqliteTransport", "__version__", "msgbroker_providers"]


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    """The provider classes of this plugin."""
    return [SqliteTransport]
