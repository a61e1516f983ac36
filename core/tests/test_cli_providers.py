"""The CLI session on every real provider: publish → pending → tail → a failing handler lands the
message in the dead letters → replay → handled. The servers come from ``scripts/brokers up``
(``.brokers/env``); a missing one fails the test, it is never skipped."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import pytest
from msgbroker import Transport, registry
from msgbroker.cli import main

PROVIDERS = {
    "redis": ("MSGBROKER_REDIS__URL", ""),
    "nats": ("MSGBROKER_NATS__URL", ""),
    "rabbitmq": ("MSGBROKER_RABBITMQ__URL", ""),
    "kafka": ("MSGBROKER_KAFKA__BOOTSTRAP_SERVERS", "kafka://"),
}


def server_url(provider: str) -> str:
    variable, prefix = PROVIDERS[provider]
    value = os.environ.get(variable)
    if not value:
        pytest.fail(
            f"{variable} is not set: run `scripts/brokers up` and `set -a; . .brokers/env; set +a` "
            f"(scripts/test does both) so that the {provider} CLI session has a server"
        )
    return prefix + value


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_cli_session_on_a_real_broker(
    provider: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server_url(provider)
    monkeypatch.setenv("MSGBROKER_RETRY_DELAY", "0")
    monkeypatch.setenv("MSGBROKER_CONNECT_TIMEOUT", "30")
    topic, group = f"cli-{uuid.uuid4().hex[:10]}", "cli-workers"
    common = ["--url", url, "--partition-count", "4"]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, *common])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    def lines(text: str) -> list[Any]:
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def pending() -> int:
        code, out, err = run("pending", topic, "-g", group, "--json")
        assert code == 0, err
        count: int = json.loads(out)["pending"]
        return count

    # other test runs restart these servers (fault tests): wait, bounded, for this one to answer
    deadline = time.monotonic() + 90
    while (health := run("health"))[0] != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the {provider} server at {url} does not answer: {health[1]}")
        time.sleep(1)
    # join the group first: RabbitMQ keeps only what is published after the group exists
    code, out, err = run("tail", topic, "-g", group, "--timeout", "1", "--json")
    assert code == 0 and out == "", err

    code, out, err = run("publish", topic, '[{"n": 1}, {"n": 2}, {"n": 3}]', "--key", "session-1", "--json")
    assert code == 0, err
    ids = [m["message_id"] for m in json.loads(out)["messages"]]
    assert pending() == 3

    transport = registry.by_scheme(url.split("://", 1)[0])
    code, out, err = run("tail", topic, "-g", group, "--no-ack", "--json")
    if transport.peek is Transport.peek:
        assert code == 1 and "cannot read messages without settling" in err
    else:
        assert code == 0, err
        assert [p["message_id"] for p in lines(out)] == ids
    assert pending() == 3

    code, out, err = run("tail", topic, "-g", group, "-n", "1", "--timeout", "60", "--json")
    assert code == 0, err
    assert [(h["message_id"], h["outcome"]) for h in lines(out)] == [(ids[0], "ack")]

    # a failing handler: reject sends the message straight to the dead letters
    code, out, err = run("tail", topic, "-g", group, "-n", "1", "--settle", "reject", "--timeout", "60", "--json")
    assert code == 0, err
    assert [(h["message_id"], h["outcome"]) for h in lines(out)] == [(ids[1], "reject")]
    code, out, err = run("dlq", "list", topic, "-g", group, "--json")
    assert code == 0, err
    [letter] = json.loads(out)
    assert letter["message_id"] == ids[1] and letter["payload"]["n"] == 2
    assert "rejected by msgbroker tail" in letter["error"]
    assert pending() == 1

    code, out, err = run("dlq", "replay", topic, "-g", group, "--all", "--json")
    assert code == 0 and json.loads(out)["replayed"] == 1, err
    code, out, err = run("tail", topic, "-g", group, "-n", "2", "--timeout", "60", "--json")
    assert code == 0, err
    assert sorted(h["message_id"] for h in lines(out)) == sorted([ids[1], ids[2]])
    assert json.loads(run("dlq", "list", topic, "-g", group, "--json")[1]) == []
    assert pending() == 0
