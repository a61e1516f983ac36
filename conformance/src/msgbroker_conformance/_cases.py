"""Case machinery: the ``case`` and ``requires`` decorators and the runner that turns an
``async def`` case into a plain pytest test (no pytest-asyncio configuration needed)."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from ._support import ConformanceFailure, Scenario

if TYPE_CHECKING:
    from ._harness import ConformanceHarness

__all__ = [
    "ENVIRONMENT_CAPABILITIES",
    "RULES",
    "TIERS",
    "CaseInfo",
    "case",
    "case_info",
    "missing_capability",
    "requires",
    "requires_hook",
    "session_seed",
    "set_session_seed",
]

TIERS: tuple[str, ...] = ("core", "semantics", "resilience", "model")
"""Conformance tiers, lowest first (docs/conformance.md)."""

ENVIRONMENT_CAPABILITIES: frozenset[str] = frozenset({"server_restart"})
"""Capabilities about the test setup rather than the provider's semantics: a case needing one
that is declared missing is *not applicable* (deselected and reported), not skipped."""

RULES: dict[str, str] = {
    "shape": "The shape: the partitioner, one lane per (topic, group, partition), who owns which lane",
    "1": "Rule 1, settling: return acks, raise naks with requeue, settling twice raises, nak(requeue=False) "
         "dead-letters",
    "2": "Rule 2, order: a lane's message only after every earlier one settled; a nak or delay keeps it at the "
         "head, redelivered after its delay; ordered=False bounded by max_concurrency",
    "3": "Rule 3, attempts: delivery_attempt counts deliveries, recorded by the broker (a crash counts, a delay "
         "and a hand-over do not); dead-lettered after max_retry_attempts failures",
    "4": "Rule 4, dead letters: id, topic, group, partition, partition key, last error, attempts, headers and "
         "payload kept; stored before the original is settled",
    "5": "Rule 5, replay: published back and removed; other groups ack a replay without handling it",
    "6": "Rule 6, poison messages: undecodable bytes dead-lettered at once, the lane goes on",
    "7": "Rule 7, pending count: not delivered + in flight + waiting for redelivery, per group; before a "
         "group's first subscribe, every retained message",
    "8": "Rule 8, deduplication: a repeated message id inside deduplication_window is dropped; missing "
         "capability raises CapabilityNotSupported",
    "9": "Rule 9, shutdown: close lets in-flight handlers finish; unhandled messages stay for the next owner",
    "10": "Rule 10, crash simulation: abort() settles, flushes and releases nothing; others recover",
    "11": "Rule 11, fencing: a member that lost its lease cannot settle",
    "12": "Rule 12, buffered acks: flushed on close; after a crash at most duplicates",
    "13": "Rule 13, request and reply: a request is a message of its partition; its handler's returned message "
          "answers it, a dead letter answers with its error, no answer is a timeout naming the topic",
    "14": "Rule 14, scheduled messages: not before its time, within the declared precision after, blocking "
          "nothing meanwhile, then in its partition's order with its id and key; cancel_scheduled; kept by the "
          "broker through restarts",
    "names": "Names: topic, group and header rules, invalid ones raise naming the value",
    "api": "The API of README and docs/semantics.md (publish returns ids, health, capabilities, the envelope)",
}
"""The parts of docs/semantics.md a case can name in ``@case(rules=...)``."""

F = TypeVar("F", bound=Callable[..., Any])
CaseFunction = Callable[[Any, Scenario], Awaitable[None]]

_seed: int | None = None


def set_session_seed(seed: int) -> None:
    """Fix the seed every case's random choices (and the state machine) derive from."""
    global _seed
    _seed = seed


def session_seed() -> int:
    """The session's seed: ``--msgbroker-seed``, ``MSGBROKER_CONFORMANCE_SEED`` or a random one."""
    global _seed
    if _seed is None:
        env = os.environ.get("MSGBROKER_CONFORMANCE_SEED")
        _seed = int(env) if env else random.SystemRandom().randrange(2**32)
    return _seed


@dataclass(frozen=True, slots=True)
class CaseInfo:
    """What the plugin and the report know about a case."""

    name: str
    tier: str
    requires: tuple[str, ...]
    hooks: tuple[str, ...]
    timeout: float
    rules: tuple[str, ...] = ()
    """The parts of docs/semantics.md the case checks (``RULES`` keys)."""


def _extend(fn: Any, attr: str, values: tuple[str, ...]) -> None:
    setattr(fn, attr, (*getattr(fn, attr, ()), *values))


def requires(*capabilities: str) -> Callable[[F], F]:
    """Gate a case on capabilities of :class:`msgbroker.Capabilities`: when the provider declares
    one missing (``False`` or ``"none"``), the case is skipped naming it and the provider's reason."""

    def mark(fn: F) -> F:
        _extend(fn, "_msgbroker_requires", capabilities)
        return fn

    return mark


def requires_hook(*hooks: str) -> Callable[[F], F]:
    """Gate a case on optional fault hooks of the harness (``restart_server``): when the harness
    does not define one, the case is skipped naming the hook."""

    def mark(fn: F) -> F:
        _extend(fn, "_msgbroker_hooks", hooks)
        return fn

    return mark


def case_info(fn: Any) -> CaseInfo | None:
    """The case description of a test function, or None for other functions."""
    tier = getattr(fn, "_msgbroker_tier", None)
    if tier is None:
        return None
    return CaseInfo(fn.__name__, tier, tuple(getattr(fn, "_msgbroker_requires", ())),
                    tuple(getattr(fn, "_msgbroker_hooks", ())), float(getattr(fn, "_msgbroker_timeout", 60.0)),
                    tuple(getattr(fn, "_msgbroker_rules", ())))


def missing_capability(harness: ConformanceHarness, names: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of ``names`` the provider declares missing, with its stated reason."""
    capabilities = harness.capabilities()
    for name in names:
        value = getattr(capabilities, name)
        if value is False or value == "none":
            return name, capabilities.reasons.get(name, "declared missing by the provider")
    return None


def case(
    tier: str = "core", timeout: float = 60.0, rules: tuple[str, ...] = ()
) -> Callable[[CaseFunction], Callable[[Any], None]]:
    """Turn ``async def test_x(self, s: Scenario)`` into a pytest test of a ConformanceSuite.

    ``rules`` names the parts of docs/semantics.md the case checks (keys of :data:`RULES`);
    the report and docs/conformance.md list them per case.

    The test connects nothing itself: it checks the harness and the gates, then runs the case
    in a fresh event loop with a fresh :class:`Scenario`, bounded by ``timeout`` seconds times
    the harness's ``timeout_multiplier``, and closes every broker the case opened.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; one of {TIERS}")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; one of {sorted(RULES)}")

    def wrap(fn: CaseFunction) -> Callable[[Any], None]:
        def test(self: Any) -> None:
            run_case(self, test, fn)

        test.__name__ = fn.__name__
        test.__qualname__ = fn.__qualname__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        test._msgbroker_tier = tier  # type: ignore[attr-defined]
        test._msgbroker_timeout = timeout  # type: ignore[attr-defined]
        test._msgbroker_rules = rules  # type: ignore[attr-defined]
        _extend(test, "_msgbroker_requires", tuple(getattr(fn, "_msgbroker_requires", ())))
        _extend(test, "_msgbroker_hooks", tuple(getattr(fn, "_msgbroker_hooks", ())))
        return pytest.mark.msgbroker_case(tier=tier)(test)  # type: ignore[no-any-return]

    return wrap


def run_case(suite: Any, test: Any, fn: CaseFunction) -> None:
    """Check the harness and the gates, then run one case to completion."""
    info = case_info(test)
    assert info is not None
    harness: ConformanceHarness | None = getattr(type(suite), "harness", None)
    if harness is None:
        raise ConformanceFailure(f"{type(suite).__name__} has no harness: set `harness = MyHarness()` on the class")
    missing = harness.missing_target()
    if missing is not None:
        pytest.fail(f"{harness.describe()}: {missing}", pytrace=False)
    gap = missing_capability(harness, info.requires)
    if gap is not None:
        name, reason = gap
        verdict = "not applicable" if name in ENVIRONMENT_CAPABILITIES else "not supported"
        pytest.skip(f"capability {name!r} {verdict} by the {harness.provider_name()} provider: {reason}")
    for hook in info.hooks:
        if not callable(getattr(harness, hook, None)):
            pytest.skip(f"case requires the fault hook {type(harness).__name__}.{hook}(), "
                        "which the harness does not supply")
    seed = session_seed()
    asyncio.run(_run(suite, harness, fn, seed, info))


async def _run(suite: Any, harness: ConformanceHarness, fn: CaseFunction, seed: int, info: CaseInfo) -> None:
    scenario = Scenario(harness, seed)
    scenario.rng = random.Random(f"{seed}-{info.name}")
    limit = info.timeout * scenario.multiplier
    try:
        async with asyncio.timeout(limit) as scope:
            await fn(suite, scenario)
    except TimeoutError as exc:
        if scope.expired():
            raise ConformanceFailure(
                f"{info.name} did not finish within {limit:.0f}s against {harness.describe()} (seed {seed})"
            ) from exc
        raise
    finally:
        await scenario.close()
