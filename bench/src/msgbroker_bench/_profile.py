"""Where the time goes on the hot paths (publish, dispatch, ack): cProfile over one end-to-end
repetition and one batched publish, per provider that is up; written to
docs/benchmarks/profile.md (file:line, calls, own time per message)."""

from __future__ import annotations

import cProfile
import math
import os
import pstats
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._cells import E2EVariant, PublishVariant
from ._common import ENV_VARS, PROVIDERS, load_env, ours_overrides, reachable
from ._ours import OursDriver

__all__ = ["profile_hot_paths"]

TOP = 14


def _site(path: str, root: Path) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3" and "/" in tail else tail
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def _table(profile: cProfile.Profile, messages: int, root: Path) -> list[str]:
    stats = pstats.Stats(profile)
    entries = []
    for (path, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries.append((tottime, cumtime, calls, path, line, func))
    total = sum(e[0] for e in entries) or 1e-9
    entries.sort(reverse=True)
    lines = ["| own time µs/msg | share | cumulative µs/msg | calls/msg | function | where |",
             "|---:|---:|---:|---:|---|---|"]
    for tottime, cumtime, calls, path, line, func in entries[:TOP]:
        where = f"{_site(path, root)}:{line}" if path != "~" else "(built-in)"
        lines.append(f"| {tottime / messages * 1e6:.2f} | {tottime / total:.0%} | {cumtime / messages * 1e6:.2f} "
                     f"| {calls / messages:.2f} | `{func}` | {where} |")
    ours = [e for e in entries if "/msgbroker" in e[3]]
    ours_time = sum(e[0] for e in ours)
    lines.append("")
    lines.append(f"Own time in msgbroker code (core and provider): {ours_time / messages * 1e6:.1f} µs/msg of "
                 f"{total / messages * 1e6:.1f} µs/msg profiled ({ours_time / total:.0%}).")
    return lines


async def profile_hot_paths(
    root: Path,
    log: Callable[[str], None],
    deadline: float = math.inf,
    providers: Sequence[str] | None = None,
    out_dir: Path | None = None,
) -> None:
    load_env(root)
    wanted = set(providers or PROVIDERS)
    unreachable: list[str] = []
    targets = [("memory", "memory://")] if "memory" in wanted else []
    for provider in ("redis", "nats", "rabbitmq", "kafka"):
        if provider not in wanted:
            continue
        url = os.environ.get(ENV_VARS[provider], "")
        if url and reachable(url, 0):
            targets.append((provider, f"kafka://{url}" if provider == "kafka" else url))
        else:
            unreachable.append(provider)
    out = [
        "## Profile of the hot paths",
        "",
        "cProfile (deterministic, so absolute times are inflated ~1.5–2× and small functions most) over one "
        "batched publish of 100 B messages and one ordered end-to-end repetition (1 worker, 64 partitions, "
        "handler acks each), per provider. Own time per message, largest first; `poll of select.epoll` is "
        "the event loop waiting for the server (I/O), not CPU.",
        "",
    ]
    counts = {"memory": (10_000, 10_000), "rabbitmq": (1_000, 500)}
    for provider, url in targets:
        if time.monotonic() > deadline - 8:
            out += [f"### {provider}", "", "Not profiled: the run's time budget was spent.", ""]
            continue
        try:
            n_pub, n_e2e = counts.get(provider, (2_000, 1_000))
            pub = PublishVariant("ours", OursDriver(provider, url, 64, ours_overrides(provider)), "batch",
                                 n_pub, 100, 500)
            await pub.setup()
            profile = cProfile.Profile()
            profile.enable()
            await pub.rep(1)
            profile.disable()
            await pub.teardown()
            e2e = E2EVariant("ours", OursDriver(provider, url, 64, ours_overrides(provider)), messages=n_e2e,
                             size=100, workers=1, partitions=64, ordered=True, timeout=30)
            await e2e.setup()
            profile2 = cProfile.Profile()
            t0 = time.perf_counter()
            profile2.enable()
            result = await e2e.rep(1)
            profile2.disable()
            took = time.perf_counter() - t0
            await e2e.teardown()
            out += [f"### {provider}: publish_batch ({n_pub:,} messages, batches of 500)", "",
                    *_table(profile, n_pub, root), "",
                    f"### {provider}: ordered end to end ({n_e2e:,} messages, {result['status']}, "
                    f"{n_e2e / took:,.0f} msg/s under the profiler)", "",
                    *_table(profile2, n_e2e, root), ""]
            log(f"profiled {provider}")
        except Exception as exc:
            out += [f"### {provider}", "", f"Profiling failed: {type(exc).__name__}: {exc}", ""]
            log(f"profiling {provider} failed: {exc}")
    if unreachable:
        out += [f"Not profiled (server not reachable at the time): {', '.join(unreachable)}.", ""]
    path = (out_dir or root / "docs" / "benchmarks") / "profile.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))
    log(f"wrote {path}")
