"""``msgbroker run module:service`` as a process (issue 19, deliverable 1, the row "deploying a
worker"): it runs the service until SIGTERM/SIGINT, drains what is in flight, serves /health and
/metrics on request, and says in one line what is wrong. The multi-process run on Redis (nothing
lost or out of order across a SIGTERM and a restart) is examples/service/tests/test_run_redis.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from msgbroker.cli import main

SERVICE = """
import asyncio
import os

import msgbroker
from msgbroker import Message


class Job(Message):
    n: int


service = msgbroker.Service("memory://run-test", title="jobs", retry_delay=0)
OUT = os.environ["RUN_TEST_OUT"]
PAUSE = float(os.environ.get("RUN_TEST_PAUSE", "0.05"))


def note(text: str) -> None:
    with open(OUT, "a") as f:
        f.write(text + "\\n")


@service.on_startup
async def seed() -> None:
    await service.broker.publish_batch("jobs", [Job(n=i) for i in range(200)])


@service.on_shutdown
async def bye() -> None:
    note("shutdown")


@service.subscriber("jobs", "workers", ordered=False, max_concurrency=4)
async def work(job: Job) -> None:
    note(f"start {job.n}")
    await asyncio.sleep(PAUSE)
    note(f"end {job.n}")
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "jobs_service.py").write_text(textwrap.dedent(SERVICE))
    return tmp_path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("MSGBROKER_"):
            monkeypatch.delenv(name)
    yield


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _stop_what_a_test_left() -> Iterator[None]:
    """A test that failed half-way leaves its ``msgbroker run`` running: SIGTERM (a supervisor
    passes it to its workers), then SIGKILL."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate()


def start(workdir: Path, *args: str, pause: float = 0.05) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSGBROKER_")}
    env |= {"RUN_TEST_OUT": str(workdir / "out.txt"), "RUN_TEST_PAUSE": str(pause)}
    proc = subprocess.Popen([sys.executable, "-m", "msgbroker.cli", "run", "jobs_service:service", *args],
                            cwd=workdir, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _STARTED.append(proc)
    return proc


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r}; stderr: {''.join(seen)}")


def lines(workdir: Path) -> list[str]:
    path = workdir / "out.txt"
    return path.read_text().splitlines() if path.exists() else []


def wait_until(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_the_handlers_in_flight_and_exits_0(workdir: Path, sig: signal.Signals) -> None:
    proc = start(workdir, pause=0.2)
    wait_for_line(proc, r"worker 0 \(pid \d+\) running 1 subscriber\(s\) on memory://run-test")
    wait_until(lambda: len([line for line in lines(workdir) if line.startswith("start")]) >= 8)  # mid-stream
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "worker 0: stopping, draining in-flight messages" in err and "worker 0: stopped" in err
    out = lines(workdir)
    started = {line.split()[1] for line in out if line.startswith("start")}
    ended = {line.split()[1] for line in out if line.startswith("end")}
    assert started == ended  # every handler that began finished before the process left
    assert 8 <= len(started) < 200  # stopped mid-stream, not at the end
    assert out[-1] == "shutdown"  # the shutdown hook ran after the last handler


def test_a_second_signal_stops_at_once_with_exit_1(workdir: Path) -> None:
    proc = start(workdir, pause=30)
    wait_for_line(proc, r"running 1 subscriber")
    wait_until(lambda: len(lines(workdir)) >= 4)  # four handlers asleep for 30 s
    proc.send_signal(signal.SIGTERM)
    wait_for_line(proc, r"stopping, draining")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "worker 0: not drained (second signal or over 40s); dropped the connection" in err
    assert not [line for line in lines(workdir) if line.startswith("end")]


def test_health_and_metrics_over_http(workdir: Path) -> None:
    proc = start(workdir, "--http", "0", "--log-level", "info", pause=0.01)
    try:
        port = int(wait_for_line(proc, r"http://127\.0\.0\.1:(\d+)/health").group(1))
        wait_for_line(proc, r" INFO msgbroker\.run: jobs as workers: member \w+, partitions \[")  # --log-level
        wait_until(lambda: len([line for line in lines(workdir) if line.startswith("end")]) == 200)
        status, body = get(f"http://127.0.0.1:{port}/health")
        health = json.loads(body)
        assert status == 200 and health["healthy"] is True and health["provider"] == "memory"
        assert [(s["topic"], s["group"]) for s in health["subscriptions"]] == [("jobs", "workers")]
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        handled = re.search(r'messaging_process_duration_seconds_count\{[^}]*outcome="ack"\} (\S+)', text)
        assert handled and float(handled.group(1)) == 200.0, text
        assert re.search(r'msgbroker_messages_pending\{[^}]*\} 0\.0', text), text
        assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404
        taken = start(workdir, "--http", str(port))  # a second worker on the same port: one line, exit 1
        _, err = taken.communicate(timeout=30)
        assert taken.returncode == 1
        assert err.strip().splitlines()[-1].startswith(f"msgbroker: error: cannot serve --http on 127.0.0.1:{port}: ")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_what_is_wrong_is_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    name = f"bad_service_{uuid.uuid4().hex[:8]}"
    (workdir / f"{name}.py").write_text(textwrap.dedent("""
        import msgbroker

        service = msgbroker.Service(title="bad")

        @service.subscriber("jobs", "workers")
        def not_async(job):
            pass
    """))
    assert main(["run", f"{name}:service"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{name}.not_async is not async: declare it with 'async def'" in err
    (workdir / "no_broker.py").write_text("import msgbroker\nservice = msgbroker.Service()\n")
    assert main(["run", "no_broker:service"]) == 1
    assert "the service 'msgbroker service' names no broker: pass --url" in capsys.readouterr().err
    assert main(["run", "no_broker:service", "--workers", "0"]) == 2
    sys.modules.pop("no_broker", None)


def test_the_supervisor_restarts_a_worker_that_died_and_stops_them_all(workdir: Path) -> None:
    proc = start(workdir, "--workers", "2", pause=0.01)
    wait_for_line(proc, r"memory:// lives in one process: each of the 2 workers has a broker of its own")
    first = wait_for_line(proc, r"supervisor \(pid \d+\): 2 workers, pids (\d+) (\d+)")
    wait_for_line(proc, r"worker [01] \(pid \d+\) running")
    wait_for_line(proc, r"worker [01] \(pid \d+\) running")
    os.kill(int(first.group(1)), signal.SIGKILL)
    wait_for_line(proc, rf"worker 0 \(pid {first.group(1)}\) exited with -9; starting it again")
    again = wait_for_line(proc, r"worker 0 \(pid (\d+)\) running")
    assert again.group(1) != first.group(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sorted(re.findall(r"worker (\d): stopped", err)) == ["0", "1"]


def test_a_worker_that_fails_at_startup_stops_the_supervisor(workdir: Path) -> None:
    (workdir / "jobs_service.py").write_text(textwrap.dedent("""
        import msgbroker

        service = msgbroker.Service("memory://x")

        @service.on_startup
        async def open_database() -> None:
            raise RuntimeError("the database is down")
    """))
    proc = start(workdir, "--workers", "2", pause=0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "failed at startup (exit 1); stopping the others" in err
    assert "msgbroker: error: starting the service failed: RuntimeError: the database is down" in err
    assert "starting it again" not in err
