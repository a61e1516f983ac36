"""The pytest plugin of msgbroker (entry point ``pytest11``): the ``msgbroker_run`` fixture.

::

    async def test_orders(msgbroker_run):
        run = await msgbroker_run(service, retry_delay=0)
        await run.publish("orders", Order(...))
        await run.settled()
        assert [m.order_id for m in run.messages("ack")] == [...]

Needs pytest-asyncio (the fixture is async); the runs are stopped when the test ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ._harness import ServiceRun, run_in_memory
from ._service import Service

__all__ = ["msgbroker_run"]

StartRun = Callable[..., Awaitable[ServiceRun]]


async def _runs() -> AsyncIterator[StartRun]:
    """``await msgbroker_run(service, **overrides)``: start ``service`` on its own in-memory broker
    (see :func:`msgbroker.testing.run_in_memory`); returns a :class:`msgbroker.testing.ServiceRun`."""
    async with contextlib.AsyncExitStack() as runs:

        async def start(service: Service, **overrides: Any) -> ServiceRun:
            return await runs.enter_async_context(run_in_memory(service, **overrides))

        yield start


def _missing() -> StartRun:
    raise pytest.UsageError("the msgbroker_run fixture needs pytest-asyncio: pip install pytest-asyncio")


msgbroker_run: Any
try:
    import pytest_asyncio
except ImportError:  # the fixture then says what is missing
    msgbroker_run = pytest.fixture(_missing, name="msgbroker_run")
else:
    msgbroker_run = pytest_asyncio.fixture(_runs, name="msgbroker_run")
