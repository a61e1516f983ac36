"""The msgbroker command against the in-memory provider: each invocation runs in-process with its
own event loop, and ``memory://NAME`` keeps the broker's state between them."""

from __future__ import annotations

import ast
import graphlib
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import tomllib
import types
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import msgbroker
import pytest
from msgbroker import Capabilities, CapabilityNotSupported, Transport, hookimpl, registry
from msgbroker._memory import MemoryTransport
from msgbroker.cli import ENTRY_POINT_GROUP, main

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def url() -> str:
    return f"memory://cli-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MSGBROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MSGBROKER_RETRY_DELAY", "0")  # naks come back at once


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def invoke(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_one_line_error(code: int, err: str, *, exit_code: int | None = None) -> None:
    assert code != 0
    if exit_code is not None:
        assert code == exit_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("msgbroker: error: ")
    assert "Traceback" not in err


def pending(run: Run, url: str, topic: str, group: str) -> dict[str, Any]:
    code, out, _ = run("pending", topic, "--group", group, "--url", url, "--json")
    assert code == 0
    result: dict[str, Any] = json.loads(out)
    return result


def test_session_publish_pending_tail_dead_letter_replay(run: Run, url: str) -> None:
    # publish: three messages with one key, so one partition, in order
    messages = [{"seat": f"R1-{n}", "n": n} for n in (1, 2, 3)]
    code, out, _ = run(
        "publish", "seat-locks", json.dumps(messages), "--key", "session-1:area-7", "--url", url, "--json"
    )
    assert code == 0
    published = json.loads(out)
    assert published["topic"] == "seat-locks" and published["published"] == 3
    partition = msgbroker.partition_for("session-1:area-7", 64)
    assert {m["partition"] for m in published["messages"]} == {partition}
    ids = [m["message_id"] for m in published["messages"]]

    # pending shows them, in total and on their partition
    assert pending(run, url, "seat-locks", "workers") == {
        "topic": "seat-locks",
        "group": "workers",
        "pending": 3,
        "partitions": {str(partition): 3},
    }

    # peeking settles nothing and counts no delivery
    code, out, _ = run("tail", "seat-locks", "-g", "workers", "--no-ack", "--url", url, "--json")
    assert code == 0
    peeked = json_lines(out)
    assert [p["message_id"] for p in peeked] == ids
    assert {p["delivery_attempt"] for p in peeked} == {0}
    assert pending(run, url, "seat-locks", "workers")["pending"] == 3

    # tail handles the first one
    code, out, err = run("tail", "seat-locks", "-g", "workers", "-n", "1", "--timeout", "20", "--url", url, "--json")
    assert code == 0, err
    [handled] = json_lines(out)
    assert handled["message_id"] == ids[0] and handled["message"]["n"] == 1
    assert handled["outcome"] == "ack" and handled["delivery_attempt"] == 1
    assert handled["partition"] == partition
    assert pending(run, url, "seat-locks", "workers")["pending"] == 2

    # a failing handler (nak every time) retries the second one until it lands in the dead letters
    code, out, err = run(
        "tail", "seat-locks", "-g", "workers", "-n", "3", "--settle", "nak", "--timeout", "20", "--url", url, "--json"
    )
    assert code == 0, err
    failing = json_lines(out)
    assert [f["message_id"] for f in failing] == [ids[1]] * 3
    assert [f["delivery_attempt"] for f in failing] == [1, 2, 3]
    assert pending(run, url, "seat-locks", "workers")["pending"] == 1

    code, out, _ = run("dlq", "list", "seat-locks", "-g", "workers", "--url", url, "--json")
    assert code == 0
    [letter] = json.loads(out)
    assert letter["message_id"] == ids[1] and letter["attempts"] == 3
    assert "nak by msgbroker tail" in letter["error"]
    assert letter["payload"]["n"] == 2 and letter["partition_key"] == "session-1:area-7"

    code, out, _ = run("dlq", "show", ids[1], "--topic", "seat-locks", "-g", "workers", "--url", url, "--json")
    assert code == 0
    assert json.loads(out)["payload"]["seat"] == "R1-2"
    code, out, _ = run("dlq", "show", ids[1], "--topic", "seat-locks", "-g", "workers", "--url", url)
    assert code == 0 and ids[1] in out and "R1-2" in out

    # replay brings it back, and it is handled
    code, out, _ = run("dlq", "replay", "seat-locks", "-g", "workers", "--id", ids[1], "--url", url, "--json")
    assert code == 0
    assert json.loads(out) == {"topic": "seat-locks", "group": "workers", "replayed": 1, "missing": []}
    assert json.loads(run("dlq", "list", "seat-locks", "-g", "workers", "--url", url, "--json")[1]) == []
    assert pending(run, url, "seat-locks", "workers")["pending"] == 2

    code, out, err = run("tail", "seat-locks", "-g", "workers", "-n", "2", "--timeout", "20", "--url", url, "--json")
    assert code == 0, err
    assert [h["message_id"] for h in json_lines(out)] == [ids[2], ids[1]]
    assert {h["outcome"] for h in json_lines(out)} == {"ack"}
    assert pending(run, url, "seat-locks", "workers") == {
        "topic": "seat-locks",
        "group": "workers",
        "pending": 0,
        "partitions": {},
    }


def test_human_output_of_pending_and_dead_letters(run: Run, url: str) -> None:
    run("publish", "orders", '{"n": 1}', "--url", url)
    code, out, _ = run("pending", "orders", "-g", "billing", "--url", url)
    assert code == 0 and "total" in out and "1" in out
    code, out, _ = run("dlq", "list", "orders", "-g", "billing", "--url", url)
    assert code == 0 and "no dead letters" in out
    code, out, _ = run("tail", "orders", "-g", "billing", "-n", "1", "--settle", "reject", "--url", url)
    assert code == 0 and "reject" in out
    code, out, _ = run("dlq", "list", "orders", "-g", "billing", "--url", url)
    assert code == 0 and "rejected by msgbroker" in out


def test_tail_stops_at_count_and_leaves_the_rest_unread(run: Run, url: str) -> None:
    # no key: the messages spread over partitions, several lanes read ahead
    docs = "\n".join(json.dumps({"n": n}) for n in range(12))
    code, _, _ = run("publish", "spread", docs, "--url", url)
    assert code == 0
    code, out, err = run("tail", "spread", "-g", "g", "-n", "2", "--timeout", "20", "--url", url, "--json")
    assert code == 0, err
    assert len(json_lines(out)) == 2
    assert pending(run, url, "spread", "g")["pending"] == 10
    code, out, _ = run("tail", "spread", "-g", "g", "--no-ack", "--url", url, "--json")
    rest = json_lines(out)
    assert len(rest) == 10
    assert {r["delivery_attempt"] for r in rest} == {0}, "read-ahead past --count must not count as a delivery"


def test_tail_that_gets_fewer_than_count_exits_1(run: Run, url: str) -> None:
    code, out, err = run("tail", "empty", "-g", "g", "-n", "1", "--timeout", "0.2", "--url", url, "--json")
    assert out == ""
    assert_one_line_error(code, err, exit_code=1)
    assert "0 of 1" in err


def test_tail_idle_stops_after_silence(run: Run, url: str) -> None:
    run("publish", "quiet", '{"n": 1}', "--url", url)
    code, out, err = run("tail", "quiet", "-g", "g", "--idle", "0.3", "--url", url, "--json")
    assert code == 0, err
    assert len(json_lines(out)) == 1


def test_tail_metrics_prints_this_runs_metrics(run: Run, url: str) -> None:
    run("publish", "measured", '[{"n": 1}, {"n": 2}]', "--url", url)
    code, _, err = run("tail", "measured", "-g", "g", "-n", "2", "--timeout", "20", "--metrics", "--url", url)
    assert code == 0
    assert (
        'messaging_client_consumed_messages_total{messaging_consumer_group_name="g",'
        'messaging_destination_name="measured",messaging_system="memory",outcome="ack"} 2.0'
    ) in err
    assert not any(name.startswith("msgbroker.cli") for name, _ in registry.plugins.list_name_plugin())


def test_publish_from_a_file_with_key_field_and_headers(run: Run, url: str, tmp_path: Path) -> None:
    lines = [{"session": f"s{n % 3}", "n": n} for n in range(1200)]
    file = tmp_path / "seat-locks.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, err = run(
        "publish", "bulk", "--file", str(file), "--key-field", "session", "-H", "origin=cli", "--url", url, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["published"] == 1200
    expected = {msgbroker.partition_for(f"s{n}", 64) for n in range(3)}
    assert {m["partition"] for m in result["messages"]} == expected
    code, out, _ = run("tail", "bulk", "-g", "g", "--no-ack", "-n", "1", "--url", url, "--json")
    assert json_lines(out)[0]["headers"] == {"origin": "cli"}


def test_publish_json_lines_from_stdin(run: Run, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"n": 1}\n\n{"n": 2}\n'))
    code, out, _ = run("publish", "piped", "--url", url)
    assert code == 0 and "published 2 messages" in out
    assert pending(run, url, "piped", "g")["pending"] == 2


def test_config_file_and_partition_count(run: Run, tmp_path: Path) -> None:
    name = f"cfg-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "appsettings.json"
    config.write_text(
        json.dumps({"MessageBroker": {"Provider": "memory", "PartitionCount": 8, "Memory": {"Name": name}}})
    )
    code, out, _ = run("publish", "t", '{"n": 1}', "-k", "k", "--config", str(config), "--json")
    assert code == 0
    assert json.loads(out)["messages"][0]["partition"] == msgbroker.partition_for("k", 8)
    # the URL names the broker, the file still gives the partition count
    code, out, _ = run("pending", "t", "-g", "g", "--config", str(config), "--url", f"memory://{name}", "--json")
    assert code == 0 and json.loads(out)["pending"] == 1
    code, out, _ = run("pending", "t", "-g", "g", "-p", "8", "--url", f"memory://{name}", "--json")
    assert code == 0 and json.loads(out)["pending"] == 1


def test_url_from_the_environment(run: Run, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGBROKER_URL", url)
    assert run("publish", "t", '{"n": 1}')[0] == 0
    assert pending(run, url, "t", "g")["pending"] == 1


def test_purge_asks_first(run: Run, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run("publish", "p", '[{"n": 1}, {"n": 2}]', "--url", url)
    run("tail", "p", "-g", "g", "-n", "2", "--settle", "reject", "--timeout", "20", "--url", url)
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = run("dlq", "purge", "p", "-g", "g", "--url", url)
    assert "Delete 2 dead letter(s)" in err
    assert code == 1 and "nothing deleted" in err
    assert len(json.loads(run("dlq", "list", "p", "-g", "g", "--url", url, "--json")[1])) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no answer: nothing deleted either
    assert run("dlq", "purge", "p", "-g", "g", "--url", url)[0] == 1
    code, out, _ = run("dlq", "purge", "p", "-g", "g", "--yes", "--url", url, "--json")
    assert code == 0 and json.loads(out)["purged"] == 2
    assert json.loads(run("dlq", "list", "p", "-g", "g", "--url", url, "--json")[1]) == []


def test_replay_all_and_unknown_ids(run: Run, url: str) -> None:
    run("publish", "r", '[{"n": 1}, {"n": 2}]', "--url", url)
    run("tail", "r", "-g", "g", "-n", "2", "--settle", "reject", "--timeout", "20", "--url", url)
    code, out, err = run("dlq", "replay", "r", "-g", "g", "--id", "no-such-id", "--url", url, "--json")
    assert json.loads(out)["replayed"] == 0
    assert_one_line_error(code, err)
    code, out, _ = run("dlq", "replay", "r", "-g", "g", "--all", "--url", url, "--json")
    assert code == 0 and json.loads(out)["replayed"] == 2
    assert pending(run, url, "r", "g")["pending"] == 2


def test_health_exit_codes(run: Run, url: str) -> None:
    code, out, _ = run("health", "--url", url, "--json")
    assert code == 0
    assert json.loads(out) == {"healthy": True, "provider": "memory", "url": url, "error": None}
    code, out, _ = run("health", "--url", url)
    assert code == 0 and out.startswith("healthy")


def test_health_of_an_unreachable_server_is_1(run: Run) -> None:
    code, out, _ = run("health", "--url", "redis://127.0.0.1:1", "--json")
    assert code == 1
    result = json.loads(out)
    assert result["healthy"] is False and result["provider"] == "redis" and result["error"]


def test_metrics_command_prints_pending_as_prometheus_text(run: Run, url: str) -> None:
    run("publish", "m", '[{"n": 1}, {"n": 2}]', "--url", url)
    code, out, _ = run("metrics", "m", "-g", "a", "-g", "b", "--url", url)
    assert code == 0
    assert (
        'msgbroker_messages_pending{messaging_consumer_group_name="a",messaging_destination_name="m",'
        'messaging_system="memory"} 2.0'
    ) in out
    assert 'msgbroker_up{messaging_system="memory"} 1.0' in out
    code, out, _ = run("metrics", "m", "-g", "a", "--url", url, "--json")
    assert json.loads(out) == {
        "healthy": True,
        "provider": "memory",
        "pending": [{"topic": "m", "group": "a", "pending": 2}],
    }


class _NoPerPartition(MemoryTransport):
    NAME: ClassVar[str] = "memory-no-per-partition"
    SCHEMES: ClassVar[tuple[str, ...]] = ("memlite",)
    CAPABILITIES: ClassVar[Capabilities] = MemoryTransport.CAPABILITIES

    async def pending_by_partition(self, topic: str, group: str) -> dict[int, int]:
        raise CapabilityNotSupported("not counted per partition")

    async def peek(self, topic: str, group: str, limit: int) -> list[msgbroker.Delivery]:
        raise CapabilityNotSupported("no peeking")


class _Plugin:
    @hookimpl
    def msgbroker_providers(self) -> list[type[Transport]]:
        return [_NoPerPartition]


@pytest.fixture
def lite_url() -> Iterator[str]:
    name = "test-cli-memlite"
    if not registry.plugins.has_plugin(name):
        registry.register(_Plugin(), name=name)
    yield f"memlite://cli-{uuid.uuid4().hex[:8]}"


def test_pending_says_when_the_provider_cannot_count_per_partition(run: Run, lite_url: str) -> None:
    run("publish", "t", '{"n": 1}', "--url", lite_url)
    code, out, _ = run("pending", "t", "-g", "g", "--url", lite_url, "--json")
    assert code == 0 and json.loads(out) == {"topic": "t", "group": "g", "pending": 1, "partitions": None}
    code, out, _ = run("pending", "t", "-g", "g", "--url", lite_url)
    assert code == 0 and "does not count per partition" in out


def test_no_ack_says_when_the_provider_cannot_peek(run: Run, lite_url: str) -> None:
    code, _, err = run("tail", "t", "-g", "g", "--no-ack", "--url", lite_url)
    assert_one_line_error(code, err)
    assert "cannot read messages without settling" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["publish", "t", "{not json", "--url", "memory://x"], "not valid JSON"),
        (["publish", "t", "[1, 2]", "--url", "memory://x"], "not a JSON object"),
        (["publish", "t", '{"message_id": "nope"}', "--url", "memory://x"], "message_id"),
        (["publish", "bad topic", "{}", "--url", "memory://x"], "invalid topic name"),
        (["pending", "t..x", "-g", "g", "--url", "memory://x"], "invalid topic name"),
        (["tail", "t", "-g", "bad group", "-n", "1", "--url", "memory://x"], "invalid group name"),
        (["publish", "t", "{}", "--url", "foo://somewhere"], "unknown URL scheme"),
        (["publish", "t", "{}", "--url", "no-scheme"], "no scheme"),
        (["publish", "t", "{}", "--url", "redis://127.0.0.1:1"], "127.0.0.1:1"),
        (["publish", "t", "{}"], "no broker given"),
        (["publish", "t", "--file", "/no/such/file.jsonl", "--url", "memory://x"], "cannot read"),
        (["publish", "t", "{}", "--config", "/no/such/settings.json"], "cannot read settings file"),
        (["dlq", "show", "nope", "--topic", "t", "-g", "g", "--url", "memory://x"], "no dead letter"),
        (["bench"], "benchmark harness is not installed"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    run: Run, args: list[str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "msgbroker_bench", None)  # as when bench/ is not installed
    code, _, err = run(*args)
    assert_one_line_error(code, err, exit_code=1)
    assert says in err


@pytest.mark.parametrize(
    "args",
    [
        ["tail", "t", "--url", "memory://x"],
        ["dlq", "replay", "t", "-g", "g", "--url", "memory://x"],
        ["publish", "t", "{}", "--key", "a", "--key-field", "b", "--url", "memory://x"],
        ["tail", "t", "-g", "g", "--settle", "maybe", "--url", "memory://x"],
        ["no-such-command"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(run: Run, args: list[str]) -> None:
    code, _, err = run(*args)
    assert_one_line_error(code, err, exit_code=2)


def test_demo_runs_the_seat_lock_demo(run: Run) -> None:
    code, out, _ = run("demo", "memory://", "--messages", "300", "--workers", "2", "--sessions", "5", "--areas", "2")
    assert code == 0
    assert "messages handled    300" in out and "lost                0" in out


def test_bench_hands_its_arguments_to_the_harness(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    installed(monkeypatch, *bench_entry_points(monkeypatch))  # as when bench/ is installed
    seen: list[list[str]] = []
    harness = types.ModuleType("msgbroker_bench")
    harness.run = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msgbroker_bench", harness)
    code, _, _ = run("bench", "--quick", "--providers", "memory")
    assert code == 0 and seen == [["--quick", "--providers", "memory"]]


def test_the_console_script_exit_codes(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("msgbroker")
    assert script.exists(), f"the console script is not installed next to {sys.executable}: pip install -e core"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}

    def console(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False
        )

    ok = console("publish", "t", '{"n": 1}', "--url", "memory://p", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["published"] == 1
    piped = console("publish", "t", "--url", "memory://p", stdin='{"n": 1}\n{"n": 2}\n')
    assert piped.returncode == 0 and "published 2 messages" in piped.stdout
    assert console("health", "--url", "memory://p").returncode == 0
    for args in (
        ["publish", "t", "{", "--url", "memory://p"],
        ["publish", "bad topic", "{}", "--url", "memory://p"],
        ["publish", "t", "{}", "--url", "nope://x"],
    ):
        bad = console(*args)
        assert bad.returncode == 1, bad
        assert bad.stderr.startswith("msgbroker: error: ") and bad.stderr.count("\n") == 1, bad.stderr
        assert "Traceback" not in bad.stderr
    usage = console("tail", "t", "--url", "memory://p")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert console("--help").returncode == 0


def test_metrics_serve_is_a_scrapeable_exporter_until_interrupted() -> None:
    script = Path(sys.executable).with_name("msgbroker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    argv = [str(script), "metrics", "--serve", "0", "--interval", "0.2", "--url", "memory://served"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stderr is not None
            line = process.stderr.readline()  # "serving http://127.0.0.1:PORT/metrics ..."
            assert line.startswith("serving http://127.0.0.1:"), line
            with urllib.request.urlopen(line.split()[1], timeout=10) as response:
                assert 'msgbroker_up{messaging_system="memory"} 1.0' in response.read().decode()
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 130
        finally:
            if process.poll() is None:
                process.kill()


# -- commands of other distributions: entry points of the group msgbroker.cli ---------------------

REPO = Path(__file__).resolve().parents[2]
EntryPoint = importlib.metadata.EntryPoint


def installed(monkeypatch: pytest.MonkeyPatch, *entry_points: EntryPoint) -> None:
    """As if the installed distributions declared exactly these entry points of msgbroker.cli."""
    real = importlib.metadata.entry_points

    def only_these(**params: Any) -> Any:
        if params.get("group") == ENTRY_POINT_GROUP:
            return importlib.metadata.EntryPoints(entry_points)
        return real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", only_these)


def bench_entry_points(monkeypatch: pytest.MonkeyPatch) -> list[EntryPoint]:
    """The entry points bench/pyproject.toml declares, their module importable from bench/src."""
    project = tomllib.loads((REPO / "bench" / "pyproject.toml").read_text(encoding="utf-8"))
    declared: dict[str, str] = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    monkeypatch.syspath_prepend(str(REPO / "bench" / "src"))
    return [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in declared.items()]


PLUGIN_SOURCE = """
import typer
from msgbroker.cli import CliError

hello = typer.Typer()


@hello.command()
def say(name: str = typer.Argument("world"), code: int = typer.Option(0, "--exit")) -> int:
    \"\"\"Say hello.\"\"\"
    print(f"hello {name}")
    return code


tools = typer.Typer(help="Two tools.")


@tools.command()
def one() -> None:
    print("tool one")


@tools.command()
def two() -> None:
    raise CliError("tool two failed")


def register(app: typer.Typer) -> None:
    @app.command()
    def greet(name: str) -> None:
        \"\"\"Greet NAME.\"\"\"
        print(f"greetings, {name}")

    @app.command("publish")
    def not_the_publish() -> None:
        print("a plugin's publish")


not_a_plugin = 42
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The name of a module of commands, importable for this test only."""
    name = f"fake_cli_plugin_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_plugins_add_commands_next_to_the_built_in_ones(
    run: Run, url: str, plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed(
        monkeypatch,
        EntryPoint("hello", f"{plugin}:hello", ENTRY_POINT_GROUP),  # a one-command typer app
        EntryPoint("tools", f"{plugin}:tools", ENTRY_POINT_GROUP),  # a typer app of two commands
        EntryPoint("extras", f"{plugin}:register", ENTRY_POINT_GROUP),  # a function that adds commands
    )
    code, out, _ = run("--help")
    assert code == 0
    for command in ("hello", "tools", "greet", "publish", "dlq"):
        assert f" {command} " in out, out
    assert "extras" not in out and "bench" not in out

    assert run("hello") == (0, "hello world\n", "")
    assert run("hello", "you", "--exit", "3") == (3, "hello you\n", "")
    assert run("tools", "one") == (0, "tool one\n", "")
    code, _, err = run("tools", "two")
    assert_one_line_error(code, err, exit_code=1)
    assert "tool two failed" in err
    assert run("greet", "ann") == (0, "greetings, ann\n", "")
    code, _, err = run("greet")
    assert_one_line_error(code, err, exit_code=2)

    # a name that is taken stays with the built-in command
    code, out, _ = run("publish", "t", '{"n": 1}', "--url", url, "--json")
    assert code == 0 and json.loads(out)["published"] == 1


def test_a_plugin_is_found_through_its_distributions_entry_points(run: Run, plugin: str, tmp_path: Path) -> None:
    # a distribution as pip leaves it: only its metadata says that it adds a command
    info = tmp_path / f"{plugin}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin}\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nhello = {plugin}:hello\n", encoding="utf-8")
    code, out, _ = run("--help")
    assert code == 0 and " hello " in out
    assert run("hello", "there") == (0, "hello there\n", "")


def test_without_plugins_there_is_no_bench_command(run: Run, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    installed(monkeypatch)
    code, out, _ = run("--help")
    assert code == 0 and " publish " in out and "bench" not in out
    code, _, err = run("bench", "--quick")
    assert_one_line_error(code, err, exit_code=1)
    assert "benchmark harness is not installed" in err and "msgbroker-bench" in err
    code, out, err = run("publish", "t", '{"n": 1}', "--url", url)
    assert code == 0 and "published 1 message" in out, err


def test_bench_is_listed_without_importing_the_harness(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    installed(monkeypatch, *bench_entry_points(monkeypatch))
    for name in [m for m in sys.modules if m == "msgbroker_bench" or m.startswith("msgbroker_bench.")]:
        monkeypatch.delitem(sys.modules, name)
    code, out, _ = run("--help")
    assert code == 0 and " bench " in out
    assert "msgbroker_bench" not in sys.modules

    monkeypatch.setitem(sys.modules, "msgbroker_bench", None)  # the hook without its harness
    code, _, err = run("bench")
    assert_one_line_error(code, err, exit_code=1)
    assert "benchmark harness is not installed" in err


def test_a_plugin_that_cannot_be_loaded_says_so_when_asked_for(
    run: Run, url: str, plugin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed(
        monkeypatch,
        EntryPoint("broken", "no_such_module_for_msgbroker:app", ENTRY_POINT_GROUP),
        EntryPoint("odd", f"{plugin}:not_a_plugin", ENTRY_POINT_GROUP),
        EntryPoint("hello", f"{plugin}:hello", ENTRY_POINT_GROUP),
    )
    assert run("health", "--url", url) == (0, f"healthy: memory at {url}\n", "")  # the others stay quiet
    code, out, _ = run("--help")
    assert code == 0 and " broken " in out and "Cannot be loaded" in out
    code, _, err = run("broken", "--some-option")
    assert_one_line_error(code, err, exit_code=1)
    assert "the command 'broken' of no_such_module_for_msgbroker:app cannot be loaded: ModuleNotFoundError" in err
    code, _, err = run("odd")
    assert_one_line_error(code, err, exit_code=1)
    assert "neither a typer.Typer nor a function" in err
    assert run("hello") == (0, "hello world\n", "")


def test_the_cli_modules_import_the_shared_ones_never_the_other_way_round() -> None:
    package = Path(msgbroker.cli.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("msgbroker_bench") for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("msgbroker_bench"), path.name
                if node.level == 1:
                    found |= {node.module} if node.module else {alias.name for alias in node.names}
        imports[path.stem] = found
    commands = {"publish", "tail", "pending", "health", "dlq", "metrics", "demo", "run", "asyncapi", "dashboard"}
    shared = {"_errors", "_options", "_render", "_target", "_argv", "_plugins", "_service_target", "_probe", "_loop"}
    assert set(imports) == commands | shared | {"__init__", "__main__", "_app", "_main"}
    for module in commands | shared:
        assert imports[module] <= shared, f"{module} imports {imports[module] - shared}"
    assert imports["_app"] <= commands
    list(graphlib.TopologicalSorter(imports).static_order())  # raises CycleError on an import circle
