"""The suite as shipped: ``pytest --pyargs msgbroker_conformance --msgbroker-url=URL`` (or
``--msgbroker-provider=NAME`` / ``--msgbroker-harness=module:Class``) runs every case against
an installed provider without writing a test file."""

from __future__ import annotations

from msgbroker_conformance import ConformanceSuite
from msgbroker_conformance.plugin import harness_from_options


class TestInstalledProvider(ConformanceSuite):
    """The provider the command-line options name."""

    harness = harness_from_options()
