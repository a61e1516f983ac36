"""Third-party providers get their settings through ``BrokerSettings.provider_options``."""

from __future__ import annotations

import msgbroker
import pytest
from msgbroker import BrokerSettings


def test_provider_options_default_to_empty() -> None:
    assert BrokerSettings().provider_options == {}


def test_provider_options_reach_the_provider_through_connect() -> None:
    broker = msgbroker.connect("memory://", provider_options={"sqlite": {"path": "broker.db", "claim_timeout": 2}})
    assert broker.settings.provider_options == {"sqlite": {"path": "broker.db", "claim_timeout": 2}}


def test_provider_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBROKER_PROVIDER_OPTIONS__SQLITE__PATH", "from-env.db")
    assert BrokerSettings().provider_options == {"sqlite": {"path": "from-env.db"}}
