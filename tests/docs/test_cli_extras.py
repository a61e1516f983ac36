"""docs/cli.md, "Which extras": each URL scheme it lists needs the extra it names, and the command
says so (one line, exit 1) when that extra is not installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WITHOUT_PLUGINS = """
import importlib.metadata as md, json, sys
real = md.entry_points
md.entry_points = lambda **kw: [] if kw.get("group") == "msgbroker.providers" else real(**kw)
sys.modules["prometheus_client"] = None  # as when the [prometheus] extra is not installed
from msgbroker.cli import main
results = {}
for url in json.loads(sys.argv[1]):
    code = main(["health", "-u", url])
    results[url] = code
code = main(["metrics", "t", "-g", "g", "-u", "memory://x"])
results["metrics"] = code
print(json.dumps(results))
"""


def extras_table() -> dict[str, str]:
    """scheme -> extra, from the table's provider row."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    first = "| `publish`, `tail`, `pending`, `health`, `dlq` |"
    row = next(line for line in text.splitlines() if line.startswith(first))
    return {scheme: extra for extra, schemes in re.findall(r"`\[(\w+)\]` for ((?:`[a-z]+://[^`]*`/?)+)", row)
            for scheme in re.findall(r"`([a-z]+)://", schemes)}


def test_the_table_names_an_extra_for_every_provider_scheme() -> None:
    assert extras_table() == {"redis": "redis", "rediss": "redis", "nats": "nats", "tls": "nats", "amqp": "rabbitmq",
                              "amqps": "rabbitmq", "kafka": "kafka", "sqlite": "sqlite"}


def test_without_the_extra_the_command_names_it() -> None:
    table = extras_table()
    urls = [f"{scheme}://127.0.0.1:1" if scheme != "sqlite" else "sqlite:///tmp/x.db" for scheme in table]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_PLUGINS, json.dumps(urls)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.splitlines()[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("msgbroker: error: ")]
    assert len(errors) == len(urls) + 1, done.stderr
    for (scheme, extra), error in zip(table.items(), errors[:-1], strict=True):
        assert f"pip install 'msgbroker[{extra}]'" in error, (scheme, error)
    assert all(code == 1 for code in codes.values()), codes
    assert "pip install 'msgbroker[prometheus]'" in errors[-1]
