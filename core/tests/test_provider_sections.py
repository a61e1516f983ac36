"""A provider declares its own settings section (``Transport.SETTINGS``): ``BrokerSettings``
validates it from arguments, the environment and files, and says what to install for a
section whose provider is missing."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import msgbroker
import pytest
from msgbroker import BrokerSettings, Capabilities, ConfigurationError
from msgbroker.spi import Duration, ProviderSettings, Transport, hookimpl


class ToySettings(ProviderSettings):
    path: str = "toy.db"
    claim_timeout: Duration = timedelta(seconds=10)
    depth: int = 1


class ToyTransport(msgbroker.registry.by_name("memory")):  # type: ignore[misc]
    NAME: ClassVar[str] = "toy"
    SCHEMES: ClassVar[tuple[str, ...]] = ("toy",)
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(persistent=False)
    SETTINGS = ToySettings

    def __init__(self, settings: BrokerSettings) -> None:
        super().__init__(settings)
        self.options = settings.section(ToySettings)


class _Plugin:
    @hookimpl
    def msgbroker_providers(self) -> list[type[Transport]]:
        return [ToyTransport]


@pytest.fixture(autouse=True, scope="module")
def _toy_provider() -> None:
    if not msgbroker.registry.plugins.has_plugin("toy-provider"):
        msgbroker.registry.register(_Plugin(), name="toy-provider")


def test_a_section_is_validated_against_the_providers_model_and_typed() -> None:
    settings = BrokerSettings(toy={"path": "a.db", "claim_timeout": "00:00:02"})
    assert isinstance(settings.toy, ToySettings)
    assert settings.section(ToySettings) == ToySettings(path="a.db", claim_timeout=timedelta(seconds=2))


def test_an_absent_section_has_the_models_defaults() -> None:
    assert BrokerSettings().section(ToySettings) == ToySettings()
    assert BrokerSettings().toy == ToySettings()


def test_a_bad_value_is_named_with_its_section() -> None:
    with pytest.raises(ConfigurationError, match=r"toy\.depth='deep'"):
        BrokerSettings(toy={"depth": "deep"})
    with pytest.raises(ConfigurationError, match=r"toy\.colour"):
        BrokerSettings(toy={"colour": "red"})


def test_a_section_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBROKER_TOY__PATH", "from-env.db")
    monkeypatch.setenv("MSGBROKER_TOY__DEPTH", "3")
    assert BrokerSettings().section(ToySettings) == ToySettings(path="from-env.db", depth=3)
    assert BrokerSettings(toy={"depth": 4}).section(ToySettings).depth == 4  # arguments win


def test_a_section_comes_from_a_file_and_reaches_the_provider(tmp_path: Path) -> None:
    file = tmp_path / "appsettings.json"
    file.write_text(json.dumps({"MessageBroker": {"Provider": "toy", "Toy": {"Path": "file.db", "Depth": 2}}}))
    settings = BrokerSettings.from_file(file)
    broker = msgbroker.connect(settings)
    assert broker.transport.options == ToySettings(path="file.db", depth=2)


def test_a_section_of_a_provider_not_installed_loads_and_says_what_to_install() -> None:
    settings = BrokerSettings(elsewhere={"url": "x://y"})
    with pytest.raises(ConfigurationError, match=r"'elsewhere'.*not installed.*pip install msgbroker-elsewhere"):
        _ = settings.elsewhere
    assert settings.sections()["elsewhere"] == {"url": "x://y"}


def test_an_unknown_plain_setting_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting partiton_count=3"):
        BrokerSettings(partiton_count=3)


def test_the_seed_appsettings_loads_with_only_core_installed(tmp_path: Path) -> None:
    """With no Redis or NATS provider installed the seed's sections are kept, not refused."""
    seed = {"MessageBroker": {"PartitionCount": 64, "Redis": {"ConnectionString": "localhost:6379"},
                              "Nats": {"Url": "nats://localhost:4222"}}}
    file = tmp_path / "appsettings.json"
    file.write_text(json.dumps(seed))
    code = (
        "import sys, importlib.metadata as md\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: [] if kw.get('group') == 'msgbroker.providers' else real(**kw)\n"
        "import msgbroker\n"
        f"s = msgbroker.BrokerSettings.from_file({str(file)!r})\n"
        "print(s.partition_count, sorted(s.sections()))\n"
        "try:\n    s.redis\nexcept msgbroker.ConfigurationError as e:\n    print(e)\n"
    )
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MSGBROKER_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env=env).stdout
    assert out.splitlines()[0] == "64 ['nats', 'redis']"
    assert "pip install msgbroker-redis" in out


