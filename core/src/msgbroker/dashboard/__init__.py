"""``msgbroker dashboard``: a web page over one broker — groups, partitions, owners, rates, dead
letters (docs/dashboard.md). Needs the ``dashboard`` extra (Starlette and uvicorn)."""

from __future__ import annotations

from ._app import DashboardConfig, Sampler, create_app, is_loopback

__all__ = ["DashboardConfig", "Sampler", "create_app", "is_loopback"]
