"""What used to go wrong without a word (issue #19): a settings file of Redis and NATS sections
that quietly meant the in-memory broker, a message published to ``memory://`` by a command that
then exits, memory brokers in worker processes that share nothing, and the command called from
async code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import msgbroker
import pytest
from msgbroker import BrokerSettings, ConfigurationError, Message, MessageContext
from msgbroker.cli import main, main_async
from msgbroker.testing import eventually, forget_memory_broker

SEED = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "appsettings.json"
SEED_TEXT = {
    "MessageBroker": {
        "PartitionCount": 64, "BatchSize": 100, "PollTimeout": "00:00:05",
        "Redis": {"ConnectionString": "localhost:6379", "KeyPrefix": "msgbroker"},
        "Nats": {"Url": "nats://localhost:4222", "StreamPrefix": "MSGBROKER"},
    },
    "Resilience": {"MaxRetryAttempts": 3},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MSGBROKER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def seed_file(tmp_path: Path) -> Path:
    """The seed's own file where it is beside the repository, else the same sections."""
    if SEED.is_file():
        return SEED
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps(SEED_TEXT))
    return path


@pytest.fixture
def name() -> str:
    name = f"surprise-{uuid.uuid4().hex[:10]}"
    yield name
    forget_memory_broker(name)


class Ticket(Message):
    n: int

    @property
    def partition_key(self) -> str:
        return str(self.n)


# -- a settings file of real brokers names its provider -------------------------------------------


def test_the_seed_file_still_loads_without_a_provider(seed_file: Path) -> None:
    settings = BrokerSettings.from_file(seed_file)
    assert settings.partition_count == 64
    assert settings.redis.key_prefix == "msgbroker" and settings.nats.stream_prefix == "MSGBROKER"


def test_connecting_a_file_of_broker_sections_without_a_provider_is_an_error_naming_them(seed_file: Path) -> None:
    settings = BrokerSettings.from_file(seed_file)
    with pytest.raises(ConfigurationError) as raised:
        msgbroker.connect(settings)
    message = str(raised.value)
    assert "configures nats and redis (sections 'nats', 'redis') but names no provider" in message
    assert str(seed_file) in message
    assert '"Provider": "nats"' in message and "MSGBROKER_PROVIDER=nats" in message
    assert "in-process memory broker" in message


def test_a_provider_from_the_file_the_environment_or_an_argument_is_the_choice(
    seed_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert msgbroker.connect(BrokerSettings.from_file(seed_file, provider="memory")).provider == "memory"
    assert msgbroker.connect(BrokerSettings.from_file(seed_file), provider="memory").provider == "memory"
    text = seed_file.read_text(encoding="utf-8-sig")
    with_provider = tmp_path / "with-provider.json"
    data = json.loads(text)
    data["MessageBroker"]["Provider"] = "memory"
    with_provider.write_text(json.dumps(data))
    assert msgbroker.connect(BrokerSettings.from_file(with_provider)).provider == "memory"
    monkeypatch.setenv("MSGBROKER_PROVIDER", "memory")
    assert msgbroker.connect(BrokerSettings.from_file(seed_file)).provider == "memory"


def test_a_file_without_broker_sections_still_means_the_memory_broker(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('[MessageBroker]\nPartitionCount = 8\n[MessageBroker.Memory]\nName = "x"\n')
    broker = msgbroker.connect(BrokerSettings.from_file(path))
    assert (broker.provider, broker.settings.partition_count) == ("memory", 8)


def test_other_sections_of_an_application_settings_file_are_no_providers(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps({"PartitionCount": 8, "Logging": {"LogLevel": {"Default": "Information"}},
                                "Resilience": {"MaxRetryAttempts": 3}}))
    assert msgbroker.connect(BrokerSettings.from_file(path)).provider == "memory"


def test_the_seed_file_without_its_providers_installed_still_needs_a_provider(seed_file: Path) -> None:
    code = (
        "import importlib.metadata as md\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: [] if kw.get('group') == 'msgbroker.providers' else real(**kw)\n"
        "import msgbroker\n"
        f"settings = msgbroker.BrokerSettings.from_file({str(seed_file)!r})\n"
        "try:\n    msgbroker.connect(settings)\n"
        "except msgbroker.ConfigurationError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env=env).stdout
    assert "configures nats and redis (sections 'nats', 'redis') but names no provider" in out


def test_health_with_the_seed_file_says_how_to_choose_instead_of_healthy_memory(
    seed_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["health", "-c", str(seed_file)])
    captured = capsys.readouterr()
    assert code == 1 and "healthy" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("msgbroker: error: the settings file ")
    assert "names no provider" in lines[0] and "--url" in lines[0]


# -- memory:// lives in one process ---------------------------------------------------------------


def test_publishing_to_memory_from_the_command_says_the_message_stays_in_this_process(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", "tickets", '{"n": 1}', "-u", f"memory://{name}"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("published 1 message to 'tickets'")
    note = captured.err
    assert f"memory://{name} is the in-process memory broker" in note
    assert "lives only in this process and is gone when the command exits" in note
    assert "sqlite:///PATH (pip install 'msgbroker[sqlite]')" in note


WORKERS = """
import asyncio, multiprocessing, sys
import msgbroker

class Ticket(msgbroker.Message):
    n: int

    @property
    def partition_key(self):
        return str(self.n)

async def consume(expect):
    handled = []

    async def handle(ctx):
        handled.append(ctx.message.n)

    async with msgbroker.connect("memory://tickets", partition_count=4) as broker:
        await broker.subscribe("tickets", "workers", handle, message_type=Ticket)
        await asyncio.sleep(1.0)  # the window in which nothing arrives (spawn)
        for _ in range(90):  # and until a forked worker handled its copy of all 20
            if len(handled) >= expect:
                break
            await asyncio.sleep(0.1)
    return len(handled)

def work(expect):
    return asyncio.run(consume(expect))

async def publish():
    async with msgbroker.connect("memory://tickets", partition_count=4) as broker:
        await broker.publish_batch("tickets", [Ticket(n=n) for n in range(20)])

if __name__ == "__main__":
    asyncio.run(publish())
    with multiprocessing.get_context(sys.argv[1]).Pool(2) as pool:
        expect = 0 if sys.argv[1] == "spawn" else 20
        print(pool.map(work, [expect, expect]))
"""


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_memory_brokers_in_worker_processes_warn_that_they_share_nothing(tmp_path: Path, start_method: str) -> None:
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent(WORKERS))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    done = subprocess.run([sys.executable, str(script), start_method], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    # Nothing is shared: spawned workers never see what the parent published; forked ones each
    # handle their own copy of all of it.
    assert done.stdout.strip() == ("[0, 0]" if start_method == "spawn" else "[20, 20]")
    warnings = [line for line in done.stderr.splitlines() if "memory://tickets is an in-process broker" in line]
    assert len(warnings) == 2, done.stderr  # one per worker; the parent, a lone process, says nothing
    assert "every process has a broker of its own" in warnings[0]
    assert "sqlite:///PATH" in warnings[0]


# -- the command from async code ------------------------------------------------------------------


async def test_main_inside_a_running_event_loop_runs_the_command(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://{name}"
    got: list[int] = []

    async def handle(ctx: MessageContext[Ticket]) -> None:
        got.append(ctx.message.n)

    async with msgbroker.connect(url) as broker:
        assert main(["publish", "tickets", '{"n": 7}', "-k", "7", "-u", url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["published"] == 1
        assert await broker.pending_count("tickets", "workers") == 1
        await broker.subscribe("tickets", "workers", handle)
        assert main(["publish", "tickets", '{"n": 8}', "-u", url]) == 0  # while a subscriber waits here
        await eventually(lambda: sorted(got) == [7, 8], timeout=5, what="both messages")


async def test_main_async_runs_the_command_on_the_callers_loop(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://{name}"
    got: list[int] = []
    loop = asyncio.get_running_loop()
    loops: list[asyncio.AbstractEventLoop] = []

    async def handle(ctx: MessageContext[Ticket]) -> None:
        loops.append(asyncio.get_running_loop())
        got.append(ctx.message.n)

    async with msgbroker.connect(url) as broker:
        await broker.subscribe("tickets", "workers", handle)
        assert await main_async(["publish", "tickets", '[{"n": 1}, {"n": 2}]', "-u", url]) == 0
        await eventually(lambda: sorted(got) == [1, 2], timeout=5, what="both messages")
        assert loops == [loop, loop]
        assert await main_async(["pending", "tickets", "-g", "workers", "-u", url, "--json"]) == 0
    assert '"pending": 0' in capsys.readouterr().out


async def test_main_async_reports_errors_as_main_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert await main_async(["health", "-u", "mqtt://nowhere"]) == 1
    assert capsys.readouterr().err.startswith("msgbroker: error: unknown URL scheme 'mqtt://'")


def test_sqlite_without_its_distribution_says_what_to_install() -> None:
    code = (
        "import importlib.metadata as md\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda **kw: [] if kw.get('group') == 'msgbroker.providers' else real(**kw)\n"
        "import msgbroker\n"
        "try:\n    msgbroker.connect('sqlite:///broker.db')\n"
        "except msgbroker.ConfigurationError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env=env).stdout
    assert "the 'sqlite' provider is not installed: pip install 'msgbroker[sqlite]'" in out
