"""The extension boundary: every hook msgbroker calls, in one file (pluggy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._provider import Transport

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("msgbroker")
hookimpl = pluggy.HookimplMarker("msgbroker")


@hookspec
def msgbroker_providers() -> list[type[Transport]]:  # type: ignore[empty-body]
    """Return the provider classes this plugin offers.

    Each class subclasses :class:`msgbroker.Transport` and sets ``NAME`` (the
    ``BrokerSettings.provider`` value), ``SCHEMES`` (URL schemes) and ``CAPABILITIES``.
    Plugins are found through the entry-point group ``msgbroker.providers``.
    """
