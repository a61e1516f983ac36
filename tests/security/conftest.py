"""Shared by the security tests."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest


@pytest.fixture(autouse=True)
async def _collect_dropped_client_connections() -> AsyncIterator[None]:
    """Collect garbage before the test's event loop closes. These tests make clients fail on
    purpose (untrusted certificates, refused logins); aiokafka drops a connection whose
    handshake failed after its socket connected (aio-libs/aiokafka#715). Collected while the
    loop runs, its ``__del__`` closes it; collected later, in another test, its socket is only
    reported as unclosed — and fails that test."""
    yield
    gc.collect()
