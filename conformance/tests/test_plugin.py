"""The pytest plugin as a provider author meets it: options in --help, a missing server fails
(never skips), a declared-missing capability skips naming it, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

HARNESSES = '''
from typing import Any, ClassVar

import msgbroker
from msgbroker import Capabilities, Transport, hookimpl
from msgbroker_conformance import ConformanceHarness, ConformanceSuite


class NoTimersTransport(msgbroker.registry.by_name("memory")):  # type: ignore[misc]
    NAME: ClassVar[str] = "no-timers"
    SCHEMES: ClassVar[tuple[str, ...]] = ("no-timers",)
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        persistent=False, delay=False, reasons={"delay": "this broker has no timers", "server_restart": "no server"})


@hookimpl
def msgbroker_providers() -> list[type[Transport]]:
    return [NoTimersTransport]


msgbroker.registry.register(__import__(__name__), name="no-timers-plugin")


class Isolated(ConformanceHarness):
    def overrides(self, namespace: str) -> dict[str, Any]:
        return {"memory": {"name": namespace, "claim_timeout": 0.5}}


class MissingHarness(Isolated):
    url = None
    url_env = "MSGBROKER_NOWHERE__URL"


class NoTimersHarness(Isolated):
    url = "no-timers://"


class MemoryHarness(Isolated):
    url = "memory://"


class TestMissing(ConformanceSuite):
    harness = MissingHarness()


class TestNoTimers(ConformanceSuite):
    harness = NoTimersHarness()


class TestMemory(ConformanceSuite):
    harness = MemoryHarness()
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_provider.py").write_text(textwrap.dedent(HARNESSES), encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n", encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )


def test_pytest_help_lists_the_plugin_options() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, timeout=120,
                            check=False)
    for option in ("--msgbroker-url", "--msgbroker-provider", "--msgbroker-harness", "--msgbroker-report",
                   "--msgbroker-seed", "--msgbroker-timeout-multiplier"):
        assert option in result.stdout, f"{option} missing from pytest --help"


def test_a_harness_without_a_url_fails_every_case_naming_the_variable(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "test_provider.py::TestMissing", "-k", "health or round_trip or reconnect")
    assert "3 failed" in result.stdout, result.stdout[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1]
    assert "MSGBROKER_NOWHERE__URL" in result.stdout


def test_a_capability_declared_missing_skips_its_cases_naming_it(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "test_provider.py::TestNoTimers", "-k",
                     "(delay or round_trip or declarations) and not hand_over")
    summary = result.stdout.strip().splitlines()[-1]
    assert "3 passed, 1 skipped" in summary, result.stdout[-3000:]
    assert "capability 'delay' not supported by the no-timers provider: this broker has no timers" in result.stdout


def test_the_report_records_each_case_and_the_not_applicable_ones(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = _pytest(tmp_path, "test_provider.py::TestMemory", "-k", "round_trip or reconnect or health",
                     f"--msgbroker-report={report}", "--msgbroker-seed=42")
    summary = result.stdout.strip().splitlines()[-1]
    assert "2 passed" in summary and "failed" not in summary and "skipped" not in summary, result.stdout[-3000:]
    data = json.loads(report.read_text(encoding="utf-8"))
    suite = data["suites"]["TestMemory"]
    assert data["seed"] == 42 and suite["seed"] == 42
    assert suite["provider"] == "memory"
    assert suite["capabilities"]["persistent"] is False
    cases = suite["cases"]
    assert cases["test_round_trip_keeps_every_field"]["status"] == "passed"
    assert cases["test_reconnect_after_server_restart"]["status"] == "not applicable"
    assert "server_restart" in cases["test_reconnect_after_server_restart"]["reason"]
    summary = next(line for line in result.stdout.splitlines() if "not applicable:" in line)
    assert "test_reconnect_after_server_restart (capability 'server_restart'" in summary, summary


def test_the_shipped_suite_runs_against_a_url_given_on_the_command_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--pyargs", "msgbroker_conformance",
            "-k", "health or round_trip", "--msgbroker-report="]
    given = subprocess.run([*base, "--msgbroker-url=memory://"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, check=False)
    assert "2 passed" in given.stdout, given.stdout[-3000:]
    missing = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert "2 failed" in missing.stdout, missing.stdout[-3000:]
    assert "--msgbroker-url" in missing.stdout


def test_the_report_names_the_rules_and_keeps_declared_missing_capabilities_apart(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = _pytest(tmp_path, "test_provider.py::TestNoTimers", "-k", "round_trip or delay_redelivers",
                     f"--msgbroker-report={report}")
    assert "1 passed, 1 skipped" in result.stdout.strip().splitlines()[-1], result.stdout[-3000:]
    data = json.loads(report.read_text(encoding="utf-8"))
    suite = data["suites"]["TestNoTimers"]
    delay_case = suite["cases"]["test_delay_redelivers_no_earlier_and_holds_the_partition"]
    assert delay_case["status"] == "not supported" and delay_case["rules"] == ["2"]
    assert suite["cases"]["test_round_trip_keeps_every_field"]["rules"] == ["api", "shape"]
    assert suite["not_supported"]["delay"]["cases"] == ["test_delay_redelivers_no_earlier_and_holds_the_partition"]
    assert suite["tier"] == "resilience", "a capability declared missing must not lower the tier"
    assert set(data["rules"]) >= {str(n) for n in range(1, 13)}
    assert "declared missing: delay (1 case(s))" in result.stdout
