"""FastStream baselines (filled in below)."""

from __future__ import annotations

from ._driver import Driver, Unsupported

__all__ = ["faststream_driver"]


def faststream_driver(provider: str, url: str) -> Driver:
    raise Unsupported("todo")
