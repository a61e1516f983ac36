"""The pytest plugin (entry point ``pytest11``): options, the case marker, deselection of cases
that do not apply to a provider's declared setup, and ``conformance-report.json``.

It adds no tests by itself: suites are activated by subclassing ``ConformanceSuite`` (or by
``pytest --pyargs msgbroker_conformance --msgbroker-url=...``, which collects the suite
module shipped in this package).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from ._cases import (
    ENVIRONMENT_CAPABILITIES,
    RULES,
    TIERS,
    case_info,
    missing_capability,
    session_seed,
    set_session_seed,
)
from ._harness import ConformanceHarness, OptionHarness, load_harness

__all__ = ["harness_from_options"]

_options: dict[str, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("msgbroker", "msgbroker conformance suite (msgbroker-conformance)")
    group.addoption("--msgbroker-url", default=None, metavar="URL",
                    help="connection URL of the broker to run the shipped suite against "
                         "(pytest --pyargs msgbroker_conformance --msgbroker-url=redis://...)")
    group.addoption("--msgbroker-provider", default=None, metavar="NAME",
                    help="provider name (an entry point of group msgbroker.providers) to test; with no URL "
                         "its settings come from the environment (MSGBROKER_<NAME>__...)")
    group.addoption("--msgbroker-harness", default=None, metavar="MODULE:CLASS",
                    help="a ConformanceHarness subclass to run the shipped suite with (isolation, fault hooks)")
    group.addoption("--msgbroker-timeout-multiplier", type=float, default=1.0, metavar="FACTOR",
                    help="scale every bounded wait of the suite (slow servers)")
    group.addoption("--msgbroker-seed", type=int, default=None, metavar="N",
                    help="seed of the suite's random choices and state machine (printed in the report)")
    group.addoption("--msgbroker-report", default="conformance-report.json", metavar="PATH",
                    help="where to write the conformance report ('' to not write one)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "msgbroker_case(tier): a msgbroker conformance case of a tier (core, semantics, resilience, model)"
    )
    seed = config.getoption("--msgbroker-seed", None)
    if seed is not None:
        set_session_seed(seed)
    _options.update(
        url=config.getoption("--msgbroker-url", None),
        provider=config.getoption("--msgbroker-provider", None),
        harness=config.getoption("--msgbroker-harness", None),
        multiplier=config.getoption("--msgbroker-timeout-multiplier", 1.0),
    )
    config.stash[_REPORT] = _Report(config.getoption("--msgbroker-report", ""))


def harness_from_options() -> ConformanceHarness:
    """The harness the command-line options describe (used by the shipped suite module)."""
    if _options.get("harness"):
        return load_harness(_options["harness"])
    return OptionHarness.for_options(_options.get("url"), _options.get("provider"), _options.get("multiplier", 1.0))


def _harness_of(item: pytest.Item) -> ConformanceHarness | None:
    cls = getattr(item, "cls", None)
    harness = getattr(cls, "harness", None) if cls is not None else None
    return harness if isinstance(harness, ConformanceHarness) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cases whose setup capability (``server_restart``) the provider declares missing do not
    apply to it: deselect them (reported as not applicable), rather than skipping."""
    report: _Report = config.stash[_REPORT]
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        info = case_info(getattr(item, "function", None))
        harness = _harness_of(item)
        environment = tuple(n for n in info.requires if n in ENVIRONMENT_CAPABILITIES) if info else ()
        gap = None
        if harness is not None and environment and harness.missing_target() is None:
            try:
                gap = missing_capability(harness, environment)
            except Exception:  # e.g. the provider is not installed: the case itself fails and says so
                gap = None
        if gap is not None and info is not None and harness is not None:
            dropped.append(item)
            report.case(item, harness, info.name, info.tier, "not applicable",
                        f"capability {gap[0]!r}: {gap[1]}", 0.0, info.rules)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    item_report: _Report | None = _current.get("report")
    if item_report is None:
        return
    item_report.logreport(report)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _current["report"] = session.config.stash[_REPORT]
    _current["items"] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    _current["items"] = {item.nodeid: item for item in session.items}


def pytest_sessionfinish(session: pytest.Session) -> None:
    report: _Report = session.config.stash[_REPORT]
    report.write()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    report: _Report | None = _current.get("report")
    if report is None or not report.suites:
        return
    for name, suite in report.suites.items():
        not_applicable = [c for c in suite["cases"].values() if c["status"] == "not applicable"]
        line = f"msgbroker conformance {name}: tier {suite['tier'] or 'none'}, seed {suite['seed']}"
        if suite["not_supported"]:
            line += "; declared missing: " + ", ".join(
                f"{capability} ({len(entry['cases'])} case(s))" for capability, entry in suite["not_supported"].items())
        if not_applicable:
            line += "; not applicable: " + ", ".join(f"{c['case']} ({c['reason']})" for c in not_applicable)
        terminalreporter.write_line(line)


_current: dict[str, Any] = {}
_REPORT = pytest.StashKey["_Report"]()


class _Report:
    """conformance-report.json: per suite (provider), the capabilities, hooks, seed, per-case
    status and the rules of docs/semantics.md it checks, the tier reached, and apart from it the
    capabilities the provider declares missing with the cases they gate (``not_supported``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.suites: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    def _suite(self, item: pytest.Item, harness: ConformanceHarness) -> dict[str, Any]:
        cls = getattr(item, "cls", None)
        name = cls.__qualname__ if cls is not None else item.nodeid
        suite = self.suites.get(name)
        if suite is None:
            try:
                provider = harness.provider_name()
                capabilities: Any = dataclasses.asdict(harness.capabilities())
                capabilities["reasons"] = dict(capabilities.get("reasons") or {})
            except Exception as exc:  # no URL, unknown provider: the cases fail and say why
                provider, capabilities = None, {"error": str(exc)}
            suite = self.suites[name] = {
                "harness": harness.describe(),
                "provider": provider,
                "capabilities": capabilities,
                "hooks": harness.hooks(),
                "seed": session_seed(),
                "cases": {},
                "tier": None,
                "not_supported": {},
            }
        return suite

    def case(self, item: pytest.Item, harness: ConformanceHarness, name: str, tier: str, status: str,
             reason: str | None, duration: float, rules: tuple[str, ...] = ()) -> None:
        suite = self._suite(item, harness)
        capability = _declared_missing(reason) if status == "skipped" else None
        if capability is not None:
            status = "not supported"
            entry = suite["not_supported"].setdefault(capability, {"reason": reason, "cases": []})
            if name not in entry["cases"]:
                entry["cases"].append(name)
        suite["cases"][name] = {"case": name, "tier": tier, "status": status, "reason": reason,
                                "rules": list(rules), "duration": round(duration, 3)}
        suite["tier"] = _tier_reached(suite["cases"].values())

    def logreport(self, report: pytest.TestReport) -> None:
        item = _current.get("items", {}).get(report.nodeid)
        if item is None:
            return
        info = case_info(getattr(item, "function", None))
        harness = _harness_of(item)
        if info is None or harness is None:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            status = "passed" if report.passed else "skipped" if report.skipped else "failed"
            reason = None
            if report.skipped and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2])
            elif report.failed:
                reason = str(report.longreprtext).strip().splitlines()[-1][:500] if report.longreprtext else "failed"
            self.case(item, harness, info.name, info.tier, status, reason, report.duration, info.rules)
            if info.tier == "model" and report.when == "call":
                from ._stateful import last_coverage

                # How often each scenario happened (crash with a message in flight, dead letter...)
                self._suite(item, harness)["cases"][info.name]["coverage"] = last_coverage()

    def write(self) -> None:
        if not self.path or not self.suites:
            return
        data = {"suite": "msgbroker-conformance", "version": _version(), "seed": session_seed(),
                "started": self.started, "rules": RULES, "suites": self.suites}
        Path(self.path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _declared_missing(reason: str | None) -> str | None:
    """The capability a skip names when the provider declared it missing (``requires``)."""
    match = re.search(r"capability '(\w+)' not supported by", reason or "")
    return match.group(1) if match else None


def _tier_reached(cases: Any) -> str | None:
    """The highest tier such that no case of it or below failed or was skipped, and each of
    those tiers passed at least one case (or none applied). A case gated on a capability the
    provider declares missing ("not supported") does not lower the tier: the report lists
    those capabilities apart, so what was proven and what was declared missing stay distinct."""
    reached = None
    by_tier: dict[str, list[str]] = {t: [] for t in TIERS}
    for c in cases:
        by_tier.setdefault(c["tier"], []).append(c["status"])
    for tier in TIERS:
        statuses = by_tier[tier]
        if not statuses:
            break
        if any(s in ("failed", "skipped") for s in statuses):
            break
        if "passed" not in statuses and any(s not in ("not applicable", "not supported") for s in statuses):
            break
        reached = tier
    return reached


def _version() -> str:
    from . import __version__

    return __version__
