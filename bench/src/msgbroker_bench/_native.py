"""Native tools."""

from __future__ import annotations

from ._driver import Driver, Unsupported

__all__ = ["native_driver"]


def native_driver(provider: str, url: str, mode: str) -> Driver:
    raise Unsupported("todo")
